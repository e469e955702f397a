"""Option 1 of the original deployment guide: an ARQ cron job ticks every active world once a second.

Each call makes a new ``WorldScheduler`` and ``SchedulerLoopRunner``, registers
the active worlds and runs ``run_once()``: the runner adopts the registered
worlds, and each world's tick covers the real time since its previous commit
(at most ``maxCatchUpSeconds``, as any late tick), so calls every second advance
the world at the real rate, whatever its ``tickIntervalSeconds``, and never count
a second twice.

Run a worker (Redis from ``ARQ_REDIS_URL``, default ``redis://127.0.0.1:6379``)::

    SCHEDULER_DATABASE__URL=sqlite+aiosqlite:///var/scheduler.db arq examples.arq_cron.WorkerSettings

In a game backend, add ``tick_all_worlds`` to the cron jobs (and ``startup``/
``shutdown`` to the hooks) of its existing ARQ worker, and give that worker a
``job_completion_wait`` (see ``WorkerSettings``) so a stop lets a tick finish. Don't run the daemon on
the same worlds at the same time: both would tick them (the ``ticks`` fence
keeps the clock right, but every other tick would fail).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from arq import cron
from arq.connections import RedisSettings

from scheduler_daemon import SchedulerLoopRunner, Store, WorldScheduler

logger = logging.getLogger("arq_cron")
#: The worker's queue; the cron job is named after it, so two deployments on one Redis never share it.
QUEUE = os.environ.get("ARQ_QUEUE_NAME", "arq:queue")


async def startup(ctx: dict[str, Any]) -> None:
    """One store (connection pool) for the worker's life, and a lock so that calls never overlap."""
    ctx["store"] = Store.from_url(os.environ["SCHEDULER_DATABASE__URL"])
    ctx["tick_lock"] = asyncio.Lock()


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["store"].dispose()


async def tick_all_worlds(ctx: dict[str, Any]) -> dict[str, Any]:
    """Tick every active world once (the guide's cron job, with this package's imports)."""
    lock: asyncio.Lock = ctx["tick_lock"]
    if lock.locked():
        # The previous call still runs (a slow database): skip this second rather than
        # tick the same worlds twice at once (the second would fail its fence).
        return {"ticked_worlds": 0, "skipped": True}
    async with lock:
        store: Store = ctx["store"]
        scheduler = WorldScheduler(store)
        active_worlds = await store.active_world_ids()
        for world_id in active_worlds:
            try:
                await scheduler.register_world(world_id)
            except Exception as e:
                logger.error(f"Failed to register world {world_id}: {e}")
        runner = SchedulerLoopRunner(scheduler)
        ticked = await runner.run_once()
        return {"ticked_worlds": ticked["ticked"], "failed": ticked["failed"], "stats": scheduler.get_stats()}


class WorkerSettings:
    """``arq examples.arq_cron.WorkerSettings``."""

    redis_settings = RedisSettings.from_dsn(os.environ.get("ARQ_REDIS_URL", "redis://127.0.0.1:6379"))
    queue_name = QUEUE
    on_startup = startup
    on_shutdown = shutdown
    # Every second. (The guide's second="*/1" is not an ARQ value: ARQ takes a number,
    # a set of numbers, or None for every value.)
    cron_jobs = [cron(tick_all_worlds, name=f"{QUEUE}:tick_all_worlds", second=None, timeout=30)]
    # On SIGTERM/SIGINT a running tick finishes and commits (up to the job's timeout) instead of
    # being cancelled mid-transaction; no new job starts meanwhile.
    job_completion_wait = 30
