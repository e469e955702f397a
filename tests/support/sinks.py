"""Generation sinks for daemon subprocess tests (configured as ``tests.support.sinks:…``).

They talk to the test through files named in the environment, so the test
can see exactly what a real daemon process handed out.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from scheduler_daemon.generation import GenerationRequest
from scheduler_daemon.settings import Settings
from scheduler_daemon.sinks.arq import ArqSink
from scheduler_daemon.sinks.arq import enqueue as arq_enqueue


def _append(env: str, line: str) -> None:
    with Path(os.environ[env]).open("a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


async def recording_sink(request: GenerationRequest) -> None:
    """Accept and record ``id idempotency_key`` in ``$SINK_RECORD_FILE``."""
    _append("SINK_RECORD_FILE", f"{request.id} {request.idempotency_key}")


async def blocking_sink(request: GenerationRequest) -> None:
    """Record the request in ``$SINK_MARKER_FILE``, then never return (the test kills the process)."""
    _append("SINK_MARKER_FILE", f"{request.id} {request.idempotency_key}")
    await asyncio.Event().wait()


class ArqEnqueueThenBlock:
    """The real ARQ sink, bound to the daemon's settings, that never returns once the job is on the queue.

    Records the request in ``$SINK_MARKER_FILE`` after the enqueue: the test
    kills the daemon between ARQ's enqueue and ``mark_handed_off``.
    """

    def __init__(self, arq: ArqSink) -> None:
        self.arq = arq

    def with_settings(self, settings: Settings) -> ArqEnqueueThenBlock:
        return ArqEnqueueThenBlock(self.arq.with_settings(settings))

    async def __call__(self, request: GenerationRequest) -> None:
        await self.arq(request)
        _append("SINK_MARKER_FILE", f"{request.id} {request.idempotency_key}")
        await asyncio.Event().wait()


arq_enqueue_then_block = ArqEnqueueThenBlock(arq_enqueue)
