"""Option 2 of the original deployment guide: a dedicated worker process runs the scheduler loop.

It registers the active worlds, then ``runner.start()`` runs until SIGTERM or
SIGINT: the worlds registered here tick at their own rate, and discovery adds
the worlds that become active later (and drops those that stop being active,
except the ones registered here by hand). A stop signal lets in-flight ticks
finish, unregisters every world and exits 0.

    SCHEDULER_DATABASE__URL=postgresql+psycopg://game@db/game python examples/dedicated_worker.py

This is what ``scheduler-daemon run`` does, without its admin API, metrics,
systemd integration and reloads: prefer the daemon unless the loop must live
in your own process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from scheduler_daemon import SchedulerLoopRunner, Store, WorldScheduler

logger = logging.getLogger("dedicated_worker")


async def main() -> None:
    store = Store.from_url(os.environ["SCHEDULER_DATABASE__URL"])
    scheduler = WorldScheduler(store)
    runner = SchedulerLoopRunner(scheduler)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # stop() before start() has begun is kept: start() then returns at once.
        loop.add_signal_handler(sig, runner.stop)
    try:
        for world_id in await store.active_world_ids():
            try:
                await scheduler.register_world(world_id)
            except Exception as exc:
                logger.error("failed to register world %s: %s", world_id, exc)
        await runner.start()  # until SIGTERM/SIGINT
    finally:
        await runner.shutdown()
        await store.dispose()
    logger.info("worker stopped")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
