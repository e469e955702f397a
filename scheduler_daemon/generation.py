"""Generation requests: the Python API for game code and workers, and the sink hand-off.

Life of a request::

    pending ──(tick claim, within quotas)──► enqueued ──(sink accepts)──► enqueued, handed off
       ▲                                        │                              │
       └──(sink fails: attempts+1, backoff)─────┘            worker: start ──► running
                                                                               │
                               complete(succeeded | failed) ◄──────────────────┘

Game code calls :func:`create_request`; the daemon claims it in a tick and,
after that tick committed, hands it to the configured sink (``[generation]
sink = "module:callable"``). A sink receives the :class:`GenerationRequest`
and must deduplicate on ``request.idempotency_key``: after a crash between
commit and hand-off the same request is handed out again. Workers report the
outcome with :func:`complete_request` (also ``scheduler-daemon jobs complete``
and the admin API).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from scheduler_daemon.simulation import generation as gen
from scheduler_daemon.simulation.generation import GenerationRequestError
from scheduler_daemon.store.errors import (
    RequestNotFoundError,
    RequestStateError,
    SessionNotFoundError,
    WorldNotFoundError,
)
from scheduler_daemon.store.generation import GenerationRequest
from scheduler_daemon.store.repository import Store

__all__ = [
    "GenerationRequest",
    "GenerationRequestError",
    "GenerationSink",
    "RequestNotFoundError",
    "RequestStateError",
    "SessionNotFoundError",
    "WorldNotFoundError",
    "cancel_request",
    "complete_request",
    "create_request",
    "get_request",
    "leave_enqueued",
    "list_requests",
    "start_requests",
]

#: Receives one claimed request after the tick committed. Raising (or timing
#: out) counts as a failed hand-off; returning means accepted. May be async.
GenerationSink = Callable[[GenerationRequest], Awaitable[None] | None]


def leave_enqueued(request: GenerationRequest) -> None:
    """The default sink: accept, leaving the row ``enqueued`` for workers (:func:`start_requests`)."""


async def create_request(
    store: Store,
    world_id: int,
    session_id: int,
    kind: str,
    payload: Mapping[str, Any],
    *,
    npc_id: int | None = None,
    priority: int = 0,
) -> int:
    """Queue a generation request for a session's user; returns its id.

    Raises :class:`GenerationRequestError` (malformed kind/payload/priority),
    :class:`WorldNotFoundError` or :class:`SessionNotFoundError`; nothing is
    written then.
    """
    kind = gen.validate_kind(kind)
    clean = gen.validate_payload(payload)
    priority = gen.validate_priority(priority)
    if npc_id is not None and (isinstance(npc_id, bool) or not isinstance(npc_id, int)):
        raise GenerationRequestError(f"npc_id: expected an integer or None, got {npc_id!r}")
    async with store.transaction() as conn:
        await store.get_world(world_id, conn)
        user_id = await store.session_user(conn, world_id, session_id)
        return await store.insert_request(
            conn,
            world_id=world_id,
            session_id=session_id,
            user_id=user_id,
            npc_id=npc_id,
            kind=kind,
            payload=clean,
            priority=priority,
        )


async def complete_request(store: Store, request_id: int, status: str, error: str | None = None) -> GenerationRequest:
    """A worker reports the outcome of an in-flight request (``enqueued`` or ``running``).

    ``status`` is ``succeeded`` or ``failed`` (:class:`ValueError` otherwise);
    ``error`` is kept on the row. Raises :class:`RequestNotFoundError` or
    :class:`RequestStateError` (e.g. it is still ``pending`` or already
    finished). Completing frees quota, so more requests flow on the next tick.
    """
    if status not in gen.COMPLETION_STATUSES:
        raise ValueError(f"status: expected one of {', '.join(gen.COMPLETION_STATUSES)}, got {status!r}")
    async with store.transaction() as conn:
        return await store.set_status(conn, request_id, allowed_from=gen.IN_FLIGHT, status=status, error=error)


async def complete_for_api(store: Store, request_id: int, status: str, error: str | None) -> dict[str, Any]:
    """``POST /api/v1/generation/{id}/complete``: :func:`complete_request` as the admin API wants it.

    Unknown id → :class:`LookupError` (404); a request that cannot take the
    status (pending, already finished) → :class:`ValueError` (409).
    """
    try:
        request = await complete_request(store, request_id, status, error)
    except RequestStateError as exc:
        raise ValueError(str(exc)) from None
    return request.to_wire()


async def in_flight_counts(store: Store) -> dict[str, int]:
    """Requests per queue status over all worlds (``worldsched_jobs{status}``).

    Only the live queue (pending, enqueued, running): finished rows grow
    without bound and would make every scrape slower.
    """
    async with store.connect() as conn:
        return await store.count_queue_by_status(conn, (gen.PENDING, *gen.IN_FLIGHT))


async def cancel_request(store: Store, request_id: int) -> GenerationRequest:
    """Cancel a request that no worker runs yet (``pending`` or ``enqueued``)."""
    async with store.transaction() as conn:
        return await store.set_status(conn, request_id, allowed_from=(gen.PENDING, gen.ENQUEUED), status=gen.CANCELLED)


async def start_requests(
    store: Store, *, limit: int = 10, world_id: int | None = None, kinds: list[str] | None = None
) -> list[GenerationRequest]:
    """Workers polling the table: take up to ``limit`` handed-off requests and mark them ``running``.

    Concurrent workers never get the same request (``SKIP LOCKED`` on PostgreSQL).
    """
    async with store.transaction() as conn:
        return await store.start_requests(conn, limit=limit, world_id=world_id, kinds=kinds)


async def get_request(store: Store, request_id: int) -> GenerationRequest:
    """One request; raises :class:`RequestNotFoundError`."""
    async with store.connect() as conn:
        return await store.get_request(conn, request_id)


async def list_requests(
    store: Store, *, world_id: int | None = None, status: str | None = None, limit: int = 100
) -> list[GenerationRequest]:
    """Requests by id, optionally of one world and/or one status."""
    if status is not None and status not in gen.STATUSES:
        raise ValueError(f"status: expected one of {', '.join(gen.STATUSES)}, got {status!r}")
    async with store.connect() as conn:
        return await store.list_requests(conn, world_id=world_id, status=status, limit=limit)
