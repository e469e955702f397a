"""The ARQ sink: each claimed generation request becomes one job on an ARQ queue in Redis.

Configured with ``[generation] sink = "scheduler_daemon.sinks.arq:enqueue"``
and ``[generation.arq]`` (Redis URL, queue, job function name). The worker's
job function is called as ``function(ctx, request)``, ``request`` being
:meth:`GenerationRequest.to_wire` (a plain dict), and reports the outcome
through ``POST /api/v1/generation/{id}/complete``.

Handed out once: the ARQ job id is ``job_id_prefix`` + the request's
idempotency key, and ARQ refuses a job id while that job or its result is in
Redis. A request handed out again after a crash between the enqueue and
``mark_handed_off`` therefore finds its job and is accepted without a second
one, as long as the first job is still queued or running (at most
``job_expires_seconds``) or its result is kept (the worker's ``keep_result``,
one hour by default). A Redis error raises, so the request goes back through
the daemon's retry path (``generation.maxAttempts``, ``retryBackoffSeconds``).
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from scheduler_daemon.settings import ArqSinkSettings, Settings
from scheduler_daemon.store.generation import GenerationRequest

try:
    from arq.connections import ArqRedis
    from redis.asyncio import ConnectionPool
    from redis.asyncio.connection import parse_url
except ModuleNotFoundError as exc:  # the optional extra is not installed
    raise ImportError(f"the ARQ sink needs the arq package ({exc}): install scheduler-daemon[arq]") from exc

__all__ = ["ArqSink", "enqueue"]

log = structlog.get_logger("scheduler_daemon.sinks.arq")


class ArqSink:
    """Enqueues each request as an ARQ job; one Redis connection pool, opened on the first request.

    The daemon builds one per process from its settings (:meth:`with_settings`)
    and closes it when it stops (:meth:`aclose`). Embedding code may build its
    own, ``ArqSink(ArqSinkSettings(redis_url=...))``, and close it likewise.
    """

    def __init__(self, settings: ArqSinkSettings | None = None) -> None:
        self.settings = settings or ArqSinkSettings()
        self._redis: ArqRedis | None = None

    def with_settings(self, settings: Settings) -> ArqSink:
        """A sink for ``[generation.arq]`` of ``settings``; ``ValueError`` if redis-py cannot use the URL."""
        arq = settings.generation.arq
        try:
            parse_url(arq.redis_url)  # what the pydantic check cannot see: query options redis-py casts
        except ValueError as exc:
            raise ValueError(f"generation.arq.redis_url: {exc}") from None
        return ArqSink(arq)

    def job_id(self, request: GenerationRequest) -> str:
        """The request's ARQ job id (stable across re-deliveries)."""
        return self.settings.job_id_prefix + request.idempotency_key

    async def __call__(self, request: GenerationRequest) -> None:
        """Enqueue ``request``; a job already in Redis under its id counts as accepted. Redis errors raise."""
        job = await self._client().enqueue_job(
            self.settings.function,
            request.to_wire(),
            _job_id=self.job_id(request),
            _queue_name=self.settings.queue_name,
            _expires=timedelta(seconds=self.settings.job_expires_seconds),
        )
        if job is None:
            log.info(
                "generation request already on the ARQ queue; not enqueued again",
                request_id=request.id,
                job_id=self.job_id(request),
            )

    def _client(self) -> ArqRedis:
        # Building the client does no I/O: redis-py connects on the first
        # command and reconnects after Redis comes back.
        if self._redis is None:
            pool = ConnectionPool.from_url(self.settings.redis_url)
            self._redis = ArqRedis(pool, default_queue_name=self.settings.queue_name)
        return self._redis

    async def aclose(self) -> None:
        """Close the connection pool (the daemon calls this when it stops)."""
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose(close_connection_pool=True)


#: The spec ``scheduler_daemon.sinks.arq:enqueue``: the daemon binds it to its
#: ``[generation.arq]`` settings; called directly it uses the defaults.
enqueue = ArqSink()
