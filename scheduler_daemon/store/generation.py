"""Generation requests' statements (``GenerationRequests``): create, claim in the tick, outbox hand-off, completion.

The claim runs inside the tick's transaction and only flips rows to
``enqueued`` (``handed_off = false``). The outbox is every ``enqueued`` row
not yet handed off; it is drained after the tick committed. On PostgreSQL the
claim locks the rows it takes ``FOR UPDATE SKIP LOCKED`` so two claimers never
take the same row and never wait for each other; SQLite serialises writers
(``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation import generation as gen
from scheduler_daemon.store.base import StoreBase
from scheduler_daemon.store.errors import RequestNotFoundError, RequestStateError
from scheduler_daemon.store.models import generation_requests as gr

#: How many candidate pages one claim reads at most (users at their cap are
#: excluded in SQL, so more than one page is rare).
_MAX_PAGES = 8


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One ``generation_requests`` row. Sinks receive this; ``idempotency_key`` dedups re-deliveries."""

    id: int
    world_id: int
    session_id: int
    user_id: str
    npc_id: int | None
    kind: str
    payload: Any
    priority: int
    status: str
    attempts: int
    handed_off: bool
    not_before: float | None
    last_error: str | None
    created_at: datetime | None
    enqueued_at: datetime | None
    finished_at: datetime | None

    @property
    def idempotency_key(self) -> str:
        """Stable across re-deliveries (after a crash the same request is handed out again)."""
        return f"generation-request-{self.id}"

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON-ready dict (CLI, admin API)."""
        return {
            "id": self.id,
            "worldId": self.world_id,
            "sessionId": self.session_id,
            "userId": self.user_id,
            "npcId": self.npc_id,
            "kind": self.kind,
            "payload": self.payload,
            "priority": self.priority,
            "status": self.status,
            "attempts": self.attempts,
            "handedOff": self.handed_off,
            "notBefore": self.not_before,
            "lastError": self.last_error,
            "createdAt": self.created_at.isoformat() if self.created_at else None,
            "enqueuedAt": self.enqueued_at.isoformat() if self.enqueued_at else None,
            "finishedAt": self.finished_at.isoformat() if self.finished_at else None,
        }


_COLUMNS = (
    gr.c.id,
    gr.c.world_id,
    gr.c.session_id,
    gr.c.user_id,
    gr.c.npc_id,
    gr.c.kind,
    gr.c.payload,
    gr.c.priority,
    gr.c.status,
    gr.c.attempts,
    gr.c.handed_off,
    gr.c.not_before,
    gr.c.last_error,
    gr.c.created_at,
    gr.c.enqueued_at,
    gr.c.finished_at,
)


def _record(row: Sequence[Any]) -> GenerationRequest:
    return GenerationRequest(
        int(row[0]),
        int(row[1]),
        int(row[2]),
        str(row[3]),
        row[4],
        row[5],
        row[6],
        int(row[7]),
        row[8],
        int(row[9]),
        bool(row[10]),
        row[11],
        row[12],
        row[13],
        row[14],
        row[15],
    )


def _postgres(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one world's claim did: requests claimed, broken rows marked failed, requests in flight after it."""

    claimed: list[int]
    rejected: list[tuple[int, str]]
    in_flight: int


class GenerationRequests(StoreBase):
    """The ``generation_requests`` table: create, claim in the tick, outbox hand-off, worker and admin transitions."""

    @staticmethod
    async def insert_request(
        conn: AsyncConnection,
        *,
        world_id: int,
        session_id: int,
        user_id: str,
        npc_id: int | None,
        kind: str,
        payload: Mapping[str, Any],
        priority: int,
    ) -> int:
        """Insert a ``pending`` request; returns its id."""
        rid = (
            await conn.execute(
                sa.insert(gr)
                .values(
                    world_id=world_id,
                    session_id=session_id,
                    user_id=user_id,
                    npc_id=npc_id,
                    kind=kind,
                    payload=dict(payload),
                    priority=priority,
                )
                .returning(gr.c.id)
            )
        ).scalar_one()
        return int(rid)

    @staticmethod
    async def in_flight_per_user(conn: AsyncConnection, world_id: int) -> dict[str, int]:
        rows = (
            await conn.execute(
                sa.select(gr.c.user_id, sa.func.count())
                .where(gr.c.world_id == world_id, gr.c.status.in_(gen.IN_FLIGHT))
                .group_by(gr.c.user_id)
            )
        ).all()
        return {str(r[0]): int(r[1]) for r in rows}

    @staticmethod
    async def claim_requests(
        conn: AsyncConnection,
        world_id: int,
        world_time: float,
        *,
        max_ops: int,
        max_in_flight_per_world: int,
        max_in_flight_per_user: int,
    ) -> ClaimResult:
        """Claim pending requests of one world within the tick budget and the quotas.

        Highest priority first, then oldest. Rows flip to ``enqueued`` (not yet
        handed off) in the caller's transaction; broken rows are marked ``failed``
        with the reason instead of being claimed (they use no quota).
        """
        per_user = await GenerationRequests.in_flight_per_user(conn, world_id)
        total = sum(per_user.values())
        budget = gen.claim_budget(max_ops, max_in_flight_per_world, total)
        claimed: list[int] = []
        rejected: list[tuple[int, str]] = []
        if budget > 0 and max_in_flight_per_user > 0:
            page = max(budget * 4, 32)
            after: tuple[int, int] | None = None
            for _ in range(_MAX_PAGES):
                full = sorted(u for u, n in per_user.items() if n >= max_in_flight_per_user)
                query = (
                    sa.select(gr.c.id, gr.c.user_id, gr.c.priority)
                    .where(
                        gr.c.world_id == world_id,
                        gr.c.status == gen.PENDING,
                        sa.or_(gr.c.not_before.is_(None), gr.c.not_before <= world_time),
                    )
                    .order_by(gr.c.priority.desc(), gr.c.id)
                    .limit(page)
                )
                if full:
                    query = query.where(gr.c.user_id.not_in(full))
                if after is not None:
                    query = query.where(
                        sa.or_(gr.c.priority < after[0], sa.and_(gr.c.priority == after[0], gr.c.id > after[1]))
                    )
                rows = (await conn.execute(query)).all()
                users = {int(r[0]): str(r[1]) for r in rows}
                plan = gen.plan_claims(
                    (gen.Candidate(int(r[0]), str(r[1])) for r in rows),
                    budget=budget - len(claimed),
                    in_flight_per_user=per_user,
                    per_user_cap=max_in_flight_per_user,
                )
                got, broken = gen.split_broken(await GenerationRequests._lock_pending(conn, world_id, plan.claim))
                for rid in got:
                    per_user[users[rid]] = per_user.get(users[rid], 0) + 1
                claimed += got
                rejected += broken
                if len(claimed) >= budget or (len(rows) < page and plan.considered == len(rows)):
                    break
                # Continue after the last candidate looked at (rows past it were not considered).
                last = rows[plan.considered - 1]
                after = (int(last[2]), int(last[0]))
        if claimed:
            await conn.execute(
                sa.update(gr)
                .where(gr.c.world_id == world_id, gr.c.id.in_(claimed))
                .values(status=gen.ENQUEUED, handed_off=False, enqueued_at=sa.func.current_timestamp())
            )
        if rejected:
            await conn.execute(
                sa.update(gr)
                .where(gr.c.world_id == world_id, gr.c.id == sa.bindparam("b_id"))
                .values(status=gen.FAILED, last_error=sa.bindparam("b_error"), finished_at=sa.func.current_timestamp()),
                [{"b_id": rid, "b_error": gen.truncate_error(reason)} for rid, reason in rejected],
            )
        return ClaimResult(claimed, rejected, total + len(claimed))

    @staticmethod
    async def _lock_pending(
        conn: AsyncConnection, world_id: int, ids: Sequence[int]
    ) -> list[tuple[int, object, object]]:
        """``(id, kind, payload)`` of the ``ids`` still pending and not held by another claimer, now ours.

        Candidates are read without locks (and without payloads) so a claimer
        only locks and decodes the rows it takes. On PostgreSQL ``SKIP LOCKED``
        drops rows another open claim holds and the status re-check drops rows
        claimed since we read them; SQLite serialises writers, so they are still
        pending there.
        """
        if not ids:
            return []
        query = sa.select(gr.c.id, gr.c.kind, gr.c.payload).where(
            gr.c.world_id == world_id, gr.c.id.in_(list(ids)), gr.c.status == gen.PENDING
        )
        if _postgres(conn):
            query = query.with_for_update(skip_locked=True)
        found = {int(r[0]): (int(r[0]), r[1], r[2]) for r in (await conn.execute(query)).all()}
        return [found[rid] for rid in ids if rid in found]

    @staticmethod
    async def outbox(conn: AsyncConnection, world_id: int, limit: int) -> list[GenerationRequest]:
        """Claimed requests of one world not yet accepted by the sink, oldest claim first."""
        rows = (
            await conn.execute(
                sa.select(*_COLUMNS)
                .where(gr.c.world_id == world_id, gr.c.status == gen.ENQUEUED, gr.c.handed_off.is_(False))
                .order_by(gr.c.enqueued_at, gr.c.id)
                .limit(limit)
            )
        ).all()
        return [_record(r) for r in rows]

    @staticmethod
    async def mark_handed_off(conn: AsyncConnection, world_id: int, request_ids: Sequence[int]) -> None:
        """The sink accepted these requests (a worker may already have moved them on)."""
        if request_ids:
            await conn.execute(
                sa.update(gr)
                .where(
                    gr.c.world_id == world_id,
                    gr.c.id.in_(list(request_ids)),
                    gr.c.status == gen.ENQUEUED,
                    gr.c.handed_off.is_(False),
                )
                .values(handed_off=True)
            )

    @staticmethod
    async def mark_handoff_failed(
        conn: AsyncConnection, world_id: int, request_id: int, decision: gen.RetryDecision, error: str
    ) -> None:
        """Back to ``pending`` with a backoff, or ``failed`` when out of attempts; the error is kept."""
        values: dict[str, Any] = {
            "attempts": decision.attempts,
            "last_error": gen.truncate_error(error),
            "handed_off": False,
        }
        if decision.failed:
            values.update(status=gen.FAILED, finished_at=sa.func.current_timestamp())
        else:
            values.update(status=gen.PENDING, not_before=decision.not_before, enqueued_at=None)
        await conn.execute(
            sa.update(gr)
            .where(
                gr.c.world_id == world_id,
                gr.c.id == request_id,
                gr.c.status == gen.ENQUEUED,
                gr.c.handed_off.is_(False),
            )
            .values(**values)
        )

    @staticmethod
    async def get_request(conn: AsyncConnection, request_id: int, *, lock: bool = False) -> GenerationRequest:
        query = sa.select(*_COLUMNS).where(gr.c.id == request_id)
        if lock and _postgres(conn):
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None:
            raise RequestNotFoundError(request_id)
        return _record(row)

    @staticmethod
    async def list_requests(
        conn: AsyncConnection, *, world_id: int | None = None, status: str | None = None, limit: int = 100
    ) -> list[GenerationRequest]:
        query = sa.select(*_COLUMNS).order_by(gr.c.id).limit(limit)
        if world_id is not None:
            query = query.where(gr.c.world_id == world_id)
        if status is not None:
            query = query.where(gr.c.status == status)
        return [_record(r) for r in (await conn.execute(query)).all()]

    @staticmethod
    async def count_queue_by_status(conn: AsyncConnection, statuses: Sequence[str]) -> dict[str, int]:
        """Requests per status over all worlds, for the given statuses (each reported, 0 included)."""
        rows = (
            await conn.execute(
                sa.select(gr.c.status, sa.func.count()).where(gr.c.status.in_(list(statuses))).group_by(gr.c.status)
            )
        ).all()
        counts = dict.fromkeys(statuses, 0)
        counts.update({str(r[0]): int(r[1]) for r in rows})
        return counts

    @staticmethod
    async def set_status(
        conn: AsyncConnection, request_id: int, *, allowed_from: Sequence[str], status: str, error: str | None = None
    ) -> GenerationRequest:
        """Move one request to ``status`` if it is in one of ``allowed_from``; returns the new row."""
        current = await GenerationRequests.get_request(conn, request_id, lock=True)
        if current.status not in allowed_from:
            raise RequestStateError(request_id, current.status, status)
        values: dict[str, Any] = {"status": status}
        if status in gen.FINISHED:
            values["finished_at"] = sa.func.current_timestamp()
        if error is not None:
            values["last_error"] = gen.truncate_error(error)
        await conn.execute(sa.update(gr).where(gr.c.id == request_id, gr.c.status == current.status).values(**values))
        return await GenerationRequests.get_request(conn, request_id)

    @staticmethod
    async def start_requests(
        conn: AsyncConnection, *, limit: int, world_id: int | None = None, kinds: Sequence[str] | None = None
    ) -> list[GenerationRequest]:
        """Workers: take handed-off ``enqueued`` requests and mark them ``running`` (oldest first)."""
        query = (
            sa.select(gr.c.id)
            .where(gr.c.status == gen.ENQUEUED, gr.c.handed_off.is_(True))
            .order_by(gr.c.priority.desc(), gr.c.id)
            .limit(limit)
        )
        if world_id is not None:
            query = query.where(gr.c.world_id == world_id)
        if kinds:
            query = query.where(gr.c.kind.in_(list(kinds)))
        if _postgres(conn):
            query = query.with_for_update(skip_locked=True)
        ids = [int(r[0]) for r in (await conn.execute(query)).all()]
        if not ids:
            return []
        await conn.execute(sa.update(gr).where(gr.c.id.in_(ids)).values(status=gen.RUNNING))
        rows = (await conn.execute(sa.select(*_COLUMNS).where(gr.c.id.in_(ids)).order_by(gr.c.id))).all()
        return [_record(r) for r in rows]
