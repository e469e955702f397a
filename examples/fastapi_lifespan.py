"""Option 3 of the original deployment guide: a FastAPI app runs the scheduler loop in its lifespan.

The active worlds are registered at start-up, ``runner.start()`` runs as a task
of the app's event loop, and at shutdown the loop stops (in-flight ticks
finish) and the worlds are unregistered. ``GET /worlds/{world_id}/stats`` shows
a world's ``get_stats()``.

    SCHEDULER_DATABASE__URL=sqlite+aiosqlite:///var/scheduler.db uvicorn examples.fastapi_lifespan:app

The ticks share the app's event loop with its requests: keep request handlers
non-blocking, or run the loop in a worker of its own (``dedicated_worker.py``).
With several app processes (uvicorn ``--workers``, replicas), run the loop in
one of them only: every process would tick the same worlds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from scheduler_daemon import SchedulerLoopRunner, Store, WorldScheduler
from scheduler_daemon.scheduler import WorldNotRegisteredError

logger = logging.getLogger("fastapi_lifespan")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    store = Store.from_url(os.environ["SCHEDULER_DATABASE__URL"])
    scheduler = WorldScheduler(store)
    for world_id in await store.active_world_ids():
        try:
            await scheduler.register_world(world_id)
        except Exception as exc:
            logger.error("failed to register world %s: %s", world_id, exc)
    runner = SchedulerLoopRunner(scheduler)
    loop_task = asyncio.create_task(runner.start())
    app.state.scheduler = scheduler
    try:
        yield
    finally:
        runner.stop()
        await loop_task
        await runner.shutdown()
        await store.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/worlds/{world_id}/stats")
async def world_stats(world_id: int, request: Request) -> dict[str, Any]:
    """The running world's stats (world time, ticks, NPCs simulated last tick, …)."""
    scheduler: WorldScheduler = request.app.state.scheduler
    try:
        return scheduler.get_context(world_id).get_stats()
    except WorldNotRegisteredError:
        raise HTTPException(status_code=404, detail=f"world {world_id} is not running") from None


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
