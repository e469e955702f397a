"""The ARQ sink against the real Redis, in process: one job per request id, and how long that holds.

The daemon end to end (crashes, outages, a worker reporting back) is in
``tests/process/test_arq_sink.py``; this pins the ARQ semantics the once-only
guarantee rests on, with a real ARQ worker run in burst mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.exceptions
from arq.connections import RedisSettings
from arq.worker import Worker, func

from scheduler_daemon.settings import ArqSinkSettings
from scheduler_daemon.sinks.arq import ArqSink
from scheduler_daemon.store.generation import GenerationRequest
from tests.support.arq_redis import ArqNamespace, free_port

# ARQ's own Worker.close() still calls redis-py's deprecated close().
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")


def claimed(request_id: int) -> GenerationRequest:
    """A request as the outbox hands it to the sink."""
    now = datetime.now(UTC)
    return GenerationRequest(
        request_id, 1, 1, "alice", 7, "portrait", {"style": "oil"}, 0, "enqueued", 0, False, None, None, now, now, None
    )


@pytest.fixture
def namespace(redis_url: str) -> Iterator[ArqNamespace]:
    ns = ArqNamespace(redis_url)
    yield ns
    ns.cleanup()


def sink_for(namespace: ArqNamespace) -> ArqSink:
    return ArqSink(
        ArqSinkSettings(
            redis_url=namespace.redis_url, queue_name=namespace.queue_name, job_id_prefix=namespace.job_id_prefix
        )
    )


async def run_worker_once(namespace: ArqNamespace, ran: list[dict[str, Any]], *, fail: bool = False) -> None:
    """A real ARQ worker in burst mode: runs what is queued, then returns; ``fail``: the job raises."""

    async def generate(ctx: dict[str, Any], request: dict[str, Any]) -> None:
        ran.append(request)
        if fail:  # as a job does whose report to the daemon fails (the daemon or its database is down)
            raise RuntimeError("POST /api/v1/generation/{id}/complete: connection refused")

    worker = Worker(
        functions=[func(generate, name="generate")],
        redis_settings=RedisSettings.from_dsn(namespace.redis_url),
        queue_name=namespace.queue_name,
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
    )
    try:
        await worker.main()
    finally:
        await worker.close()


async def test_the_same_request_handed_out_again_is_one_job_while_its_job_waits_or_runs(
    namespace: ArqNamespace,
) -> None:
    sink, request = sink_for(namespace), claimed(41)
    started, release = asyncio.Event(), asyncio.Event()

    async def generate(ctx: dict[str, Any], request: dict[str, Any]) -> None:
        started.set()
        await release.wait()

    worker = Worker(
        functions=[func(generate, name="generate")],
        redis_settings=RedisSettings.from_dsn(namespace.redis_url),
        queue_name=namespace.queue_name,
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
    )
    try:
        await sink(request)
        await sink(request)  # a re-delivery after a crash: accepted, not enqueued again
        assert namespace.queued() == 1
        assert namespace.job_keys() == [f"arq:job:{namespace.job_id(41)}"]

        running = asyncio.create_task(worker.main())
        await asyncio.wait_for(started.wait(), timeout=30)
        await sink(request)  # and while its job runs
        release.set()
        await asyncio.wait_for(running, timeout=30)
        assert namespace.queued() == 0
        assert namespace.job_keys() == [f"arq:result:{namespace.job_id(41)}"]  # it ran once
    finally:
        release.set()
        await worker.close()
        await sink.aclose()


@pytest.mark.parametrize("fails", [True, False], ids=["job-failed", "job-succeeded"])
async def test_a_request_handed_out_again_after_its_job_finished_is_a_new_job(
    namespace: ArqNamespace, fails: bool
) -> None:
    """Still handed out after its job finished: the job's report never reached the daemon (it would wait forever)."""
    sink, request = sink_for(namespace), claimed(43)
    try:
        await sink(request)
        ran: list[dict[str, Any]] = []
        await run_worker_once(namespace, ran, fail=fails)
        assert ran == [request.to_wire()]  # the job receives the request as plain JSON-ready data
        assert namespace.job_keys() == [f"arq:result:{namespace.job_id(43)}"]  # kept for the worker's keep_result

        await sink(request)
        assert namespace.queued() == 1
        await run_worker_once(namespace, ran)
        assert ran == [request.to_wire()] * 2
        assert namespace.job_keys() == [f"arq:result:{namespace.job_id(43)}"]
    finally:
        await sink.aclose()


async def test_the_job_carries_the_configured_function_and_expiry(namespace: ArqNamespace) -> None:
    sink = ArqSink(
        ArqSinkSettings(
            redis_url=namespace.redis_url,
            queue_name=namespace.queue_name,
            job_id_prefix=namespace.job_id_prefix,
            function="make_portrait",
            job_expires_seconds=600,
        )
    )
    try:
        await sink(claimed(5))
        with namespace.client() as r:
            ttl = r.pttl(f"arq:job:{namespace.job_id(5)}")
        assert 0 < ttl <= 600_000
        ran: list[dict[str, Any]] = []
        await run_worker_once(namespace, ran)  # knows only `generate`: the job fails as an unknown function
        assert ran == []
    finally:
        await sink.aclose()


async def test_redis_unreachable_raises_so_the_daemon_retries() -> None:
    sink = ArqSink(ArqSinkSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await sink(claimed(1))
    finally:
        await sink.aclose()
