"""A real ARQ worker for the ARQ sink's tests: ``python -m tests.support.arq_worker``.

Its job function ``generate(ctx, request)`` is what the daemon's ARQ sink
enqueues by default. It records each run in ``$ARQ_TEST_RUNS_FILE`` (one line:
request id, ARQ job id, try) and reports the request ``succeeded`` through the
daemon's ``POST /api/v1/generation/{id}/complete`` at ``$ARQ_TEST_DAEMON_URL``
with the token in ``$ARQ_TEST_TOKEN``. It reads ``$ARQ_TEST_REDIS_URL`` and
``$ARQ_TEST_QUEUE``.
"""

from __future__ import annotations

import logging.config
import os
from pathlib import Path
from typing import Any, ClassVar

import httpx
from arq.connections import RedisSettings
from arq.logs import default_log_config
from arq.worker import run_worker


async def generate(ctx: dict[str, Any], request: dict[str, Any]) -> str:
    """Record the run, then report the request finished to the daemon (raises if it refuses)."""
    with Path(os.environ["ARQ_TEST_RUNS_FILE"]).open("a") as fh:
        fh.write(f"{request['id']} {ctx['job_id']} {ctx['job_try']}\n")
        fh.flush()
        os.fsync(fh.fileno())
    async with httpx.AsyncClient(
        base_url=os.environ["ARQ_TEST_DAEMON_URL"],
        headers={"Authorization": f"Bearer {os.environ['ARQ_TEST_TOKEN']}"},
        timeout=10,
    ) as client:
        response = await client.post(
            f"/api/v1/generation/{request['id']}/complete", json={"status": "succeeded", "error": None}
        )
        response.raise_for_status()
    return f"portrait of request {request['id']} ({request['kind']})"


class WorkerSettings:
    """``arq`` worker settings, from the environment the test sets."""

    functions: ClassVar[list[Any]] = [generate]
    redis_settings = RedisSettings.from_dsn(os.environ["ARQ_TEST_REDIS_URL"])
    queue_name = os.environ["ARQ_TEST_QUEUE"]
    poll_delay = 0.05
    # A failed job is a failed test, not something to run again.
    max_tries = 1


if __name__ == "__main__":
    logging.config.dictConfig(default_log_config(verbose=True))  # as the `arq` command logs
    run_worker(WorkerSettings)
