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
one while that job waits or runs (its job key lives at most
``job_expires_seconds``). A request still being handed out after its job
finished never had its outcome reported (the report found the daemon or its
database down, or the request back in ``pending``), so the sink drops the
kept result and enqueues it again rather than leave it ``enqueued`` for good. A Redis error raises, so the
request goes back through the daemon's retry path (``generation.maxAttempts``,
``retryBackoffSeconds``).
"""

from __future__ import annotations

from datetime import timedelta

from scheduler_daemon.logs import get_logger
from scheduler_daemon.settings import ArqSinkSettings, Settings
from scheduler_daemon.store.generation import GenerationRequest

try:
    from arq.connections import ArqRedis
    from arq.constants import job_key_prefix, result_key_prefix
    from redis.asyncio import ConnectionPool
    from redis.asyncio.connection import parse_url
except ModuleNotFoundError as exc:  # the optional extra is not installed
    raise ImportError(f"the ARQ sink needs the arq package ({exc}): install scheduler-daemon[arq]") from exc

__all__ = ["ArqSink", "enqueue"]

log = get_logger("scheduler_daemon.sinks.arq")


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
        """Enqueue ``request`` unless its job still waits or runs (then accepted as is). Redis errors raise."""
        redis, job_id = self._client(), self.job_id(request)
        if await self._enqueue(redis, request, job_id):
            return
        if await redis.exists(job_key_prefix + job_id):
            log.info("generation_request_already_queued", request_id=request.id, job_id=job_id)
            return
        # Refused for its kept result: the job finished, yet the request is
        # still being handed out, so its report never reached the daemon (down,
        # or its database). Accepting would leave it enqueued for good.
        await redis.delete(result_key_prefix + job_id)
        if await self._enqueue(redis, request, job_id):
            log.warning(
                "generation_request_requeued",
                request_id=request.id,
                job_id=job_id,
            )

    async def _enqueue(self, redis: ArqRedis, request: GenerationRequest, job_id: str) -> bool:
        """ARQ's enqueue; False if ARQ refused the id (its job or its result is in Redis)."""
        job = await redis.enqueue_job(
            self.settings.function,
            request.to_wire(),
            _job_id=job_id,
            _queue_name=self.settings.queue_name,
            _expires=timedelta(seconds=self.settings.job_expires_seconds),
        )
        return job is not None

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
