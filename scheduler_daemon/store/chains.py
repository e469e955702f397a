"""Interaction chains' and cooldowns' statements (``Chains``); all times are world times."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation import chains as ch
from scheduler_daemon.store.base import StoreBase, dialect_insert
from scheduler_daemon.store.errors import ChainNotFoundError
from scheduler_daemon.store.models import interaction_chains as ic
from scheduler_daemon.store.models import interaction_cooldowns as cd


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """One ``interaction_chains`` row (``steps`` and ``fired`` as stored JSON)."""

    id: int
    world_id: int
    session_id: int | None
    npc_id: int | None
    chain_key: str
    steps: Any
    current_step: int
    started_at: float
    next_step_at: float | None
    completed_at: float | None
    status: str
    fired: Any
    last_error: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "worldId": self.world_id,
            "sessionId": self.session_id,
            "npcId": self.npc_id,
            "chainKey": self.chain_key,
            "steps": self.steps,
            "currentStep": self.current_step,
            "startedAt": self.started_at,
            "nextStepAt": self.next_step_at,
            "completedAt": self.completed_at,
            "status": self.status,
            "fired": self.fired,
            "lastError": self.last_error,
        }


_COLUMNS = (
    ic.c.id,
    ic.c.world_id,
    ic.c.session_id,
    ic.c.npc_id,
    ic.c.chain_key,
    ic.c.steps,
    ic.c.current_step,
    ic.c.started_at,
    ic.c.next_step_at,
    ic.c.completed_at,
    ic.c.status,
    ic.c.fired,
    ic.c.last_error,
)


def _record(r: Sequence[Any]) -> ChainRecord:
    return ChainRecord(
        int(r[0]), int(r[1]), r[2], r[3], r[4], r[5], int(r[6]), float(r[7]), r[8], r[9], r[10], r[11], r[12]
    )


@dataclass(frozen=True, slots=True)
class ChainUpdate:
    """A chain as one tick advanced it, to be written back."""

    chain_id: int
    current_step: int
    next_step_at: float | None
    status: str
    completed_at: float | None
    fired: list[dict[str, Any]]


class Chains(StoreBase):
    """The ``interaction_chains`` and ``interaction_cooldowns`` tables."""

    @staticmethod
    async def insert_chain(
        conn: AsyncConnection,
        *,
        world_id: int,
        session_id: int | None,
        npc_id: int | None,
        chain_key: str,
        steps: Sequence[ch.ChainStep],
        started_at: float,
    ) -> int:
        cid = (
            await conn.execute(
                sa.insert(ic)
                .values(
                    world_id=world_id,
                    session_id=session_id,
                    npc_id=npc_id,
                    chain_key=chain_key,
                    steps=ch.steps_to_wire(steps),
                    current_step=0,
                    started_at=started_at,
                    next_step_at=ch.first_due_at(started_at, steps),
                    status=ch.ACTIVE,
                    fired=[],
                )
                .returning(ic.c.id)
            )
        ).scalar_one()
        return int(cid)

    @staticmethod
    async def select_due_chains(
        conn: AsyncConnection, world_id: int, world_time: float, limit: int
    ) -> list[ChainRecord]:
        """Active chains of one world with a step due, most overdue first."""
        if limit <= 0:
            return []
        rows = (
            await conn.execute(
                sa.select(*_COLUMNS)
                .where(ic.c.world_id == world_id, ic.c.status == ch.ACTIVE, ic.c.next_step_at <= world_time)
                .order_by(ic.c.next_step_at, ic.c.id)
                .limit(limit)
            )
        ).all()
        return [_record(r) for r in rows]

    @staticmethod
    async def write_chain_updates(conn: AsyncConnection, world_id: int, updates: Sequence[ChainUpdate]) -> None:
        """Write advanced chains back (one executemany; ``world_id`` in every WHERE)."""
        if not updates:
            return
        await conn.execute(
            sa.update(ic)
            .where(ic.c.id == sa.bindparam("b_id"), ic.c.world_id == sa.bindparam("b_world"))
            .values(
                current_step=sa.bindparam("b_step"),
                next_step_at=sa.bindparam("b_next"),
                status=sa.bindparam("b_status"),
                completed_at=sa.bindparam("b_completed"),
                fired=sa.bindparam("b_fired", type_=ic.c.fired.type),
                updated_at=sa.func.current_timestamp(),
            ),
            [
                {
                    "b_id": u.chain_id,
                    "b_world": world_id,
                    "b_step": u.current_step,
                    "b_next": u.next_step_at,
                    "b_status": u.status,
                    "b_completed": u.completed_at,
                    "b_fired": u.fired,
                }
                for u in updates
            ],
        )

    @staticmethod
    async def fail_chains(conn: AsyncConnection, world_id: int, failures: Sequence[tuple[int, str]]) -> None:
        """Isolate broken chain rows: ``failed`` with the reason, never ticked again."""
        if not failures:
            return
        await conn.execute(
            sa.update(ic)
            .where(ic.c.id == sa.bindparam("b_id"), ic.c.world_id == sa.bindparam("b_world"))
            .values(status=ch.FAILED, last_error=sa.bindparam("b_error"), updated_at=sa.func.current_timestamp()),
            [{"b_id": cid, "b_world": world_id, "b_error": reason[:4000]} for cid, reason in failures],
        )

    @staticmethod
    async def get_chain(conn: AsyncConnection, chain_id: int) -> ChainRecord:
        row = (await conn.execute(sa.select(*_COLUMNS).where(ic.c.id == chain_id))).first()
        if row is None:
            raise ChainNotFoundError(chain_id)
        return _record(row)

    @staticmethod
    async def list_chains(
        conn: AsyncConnection, *, world_id: int | None = None, status: str | None = None, limit: int = 100
    ) -> list[ChainRecord]:
        query = sa.select(*_COLUMNS).order_by(ic.c.id).limit(limit)
        if world_id is not None:
            query = query.where(ic.c.world_id == world_id)
        if status is not None:
            query = query.where(ic.c.status == status)
        return [_record(r) for r in (await conn.execute(query)).all()]

    @staticmethod
    async def cancel_chain(conn: AsyncConnection, chain_id: int) -> bool:
        """Cancel an active chain; False if it was not active."""
        result = await conn.execute(
            sa.update(ic)
            .where(ic.c.id == chain_id, ic.c.status == ch.ACTIVE)
            .values(status=ch.CANCELLED, next_step_at=None, updated_at=sa.func.current_timestamp())
        )
        return bool(result.rowcount)

    @staticmethod
    async def last_interaction_at(
        conn: AsyncConnection, world_id: int, session_id: int, npc_id: int, key: str
    ) -> float | None:
        value = (
            await conn.execute(
                sa.select(cd.c.last_interaction_at).where(
                    cd.c.world_id == world_id,
                    cd.c.session_id == session_id,
                    cd.c.npc_id == npc_id,
                    cd.c.interaction_key == key,
                )
            )
        ).scalar_one_or_none()
        return None if value is None else float(value)

    @staticmethod
    async def upsert_interaction(
        conn: AsyncConnection, world_id: int, session_id: int, npc_id: int, key: str, world_time: float
    ) -> None:
        """Set ``lastInteractionAt`` (world time) and count the interaction; one statement on both backends."""
        stmt = dialect_insert(conn, cd).values(
            world_id=world_id, session_id=session_id, npc_id=npc_id, interaction_key=key, last_interaction_at=world_time
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[cd.c.world_id, cd.c.session_id, cd.c.npc_id, cd.c.interaction_key],
                set_={"last_interaction_at": world_time, "interactions": cd.c.interactions + 1},
            )
        )
