"""The one place that builds SQL. Everything above talks to :class:`Store`.

Hot-path functions take an open :class:`AsyncConnection` so the scheduler can
put a whole tick into one transaction; the rest open their own.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.store import migrate
from scheduler_daemon.store.database import create_engine
from scheduler_daemon.store.models import npcs, sessions, world_states, worlds


class WorldNotFoundError(LookupError):
    """No world with that id."""

    def __init__(self, world_id: int) -> None:
        self.world_id = world_id
        super().__init__(f"world {world_id} does not exist")


class StaleWorldStateError(RuntimeError):
    """The world's state row changed under us (another writer, or a lost lease)."""


class ConfigVersionConflictError(RuntimeError):
    """An optimistic config update lost against a concurrent one."""

    def __init__(self, world_id: int, expected: int, actual: int) -> None:
        self.world_id, self.expected, self.actual = world_id, expected, actual
        super().__init__(f"world {world_id}: config version is {actual}, not {expected}")


class InvalidStoredJSONError(ValueError):
    """A world's ``meta`` column holds text that is not JSON (possible on SQLite)."""

    def __init__(self, world_id: int, problem: str) -> None:
        self.world_id = world_id
        super().__init__(f"world {world_id}: meta: stored value is not valid JSON ({problem})")


@dataclass(frozen=True, slots=True)
class WorldRecord:
    """A ``worlds`` row joined with its state row (state may not exist yet)."""

    id: int
    name: str
    meta: dict[str, Any]
    config_version: int
    world_time: float | None
    ticks: int | None
    last_advanced_at: datetime | None

    @property
    def simulation_raw(self) -> Any:
        return self.meta.get("simulation")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: int
    world_id: int
    user_id: str
    location: str | None
    scene_npc_ids: list[int]
    involved_npc_ids: list[int]
    active: bool


def _now() -> datetime:
    # Wall time for humans reading the table; never used for scheduling.
    return datetime.now(UTC)


_NPC_COLUMNS = (
    npcs.c.id,
    npcs.c.world_id,
    npcs.c.name,
    npcs.c.tier,
    npcs.c.next_decision_at,
    npcs.c.location,
    npcs.c.home,
    npcs.c.routine,
    npcs.c.current_activity,
    npcs.c.activity_started_at,
    npcs.c.energy,
    npcs.c.mood_valence,
    npcs.c.mood_arousal,
    npcs.c.last_decision_at,
    npcs.c.decisions,
    npcs.c.state,
)


def _npc_from_row(row: Sequence[Any]) -> NpcState:
    return NpcState(
        id=row[0],
        world_id=row[1],
        name=row[2],
        tier=Tier(row[3]),
        next_decision_at=row[4],
        location=row[5],
        home=row[6],
        routine=row[7],
        current_activity=row[8],
        activity_started_at=row[9],
        energy=row[10],
        mood_valence=row[11],
        mood_arousal=row[12],
        last_decision_at=row[13],
        decisions=row[14],
        state=row[15] if isinstance(row[15], dict) else {},
    )


class Store:
    """Database access for the scheduler (PostgreSQL via psycopg 3, or SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Store:
        """Build a store from a ``postgresql+psycopg://`` or ``sqlite+aiosqlite://`` URL."""
        return cls(create_engine(url, **engine_kwargs))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction: committed on normal exit, rolled back on any exception."""
        async with self.engine.begin() as conn:
            yield conn

    async def ping(self) -> None:
        """Round-trip to the database (raises on failure)."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def upgrade(self) -> tuple[set[str], set[str]]:
        """Apply pending migrations."""
        return await migrate.upgrade(self.engine)

    async def check_schema(self) -> None:
        """Raise :class:`~scheduler_daemon.store.migrate.SchemaNotMigratedError` if behind."""
        await migrate.check_schema(self.engine)

    # ---------------------------------------------------------------- worlds
    async def create_world(
        self, name: str, *, simulation: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None
    ) -> int:
        """Insert a world (and its state row at world time 0); returns its id."""
        full_meta = copy.deepcopy(dict(meta or {}))
        if simulation is not None:
            full_meta["simulation"] = copy.deepcopy(dict(simulation))
        async with self.transaction() as conn:
            world_id = (
                await conn.execute(sa.insert(worlds).values(name=name, meta=full_meta).returning(worlds.c.id))
            ).scalar_one()
            await conn.execute(sa.insert(world_states).values(world_id=world_id))
        return int(world_id)

    def _world_query(self) -> sa.Select[Any]:
        return sa.select(
            worlds.c.id,
            worlds.c.name,
            worlds.c.meta,
            worlds.c.config_version,
            world_states.c.world_time,
            world_states.c.ticks,
            world_states.c.last_advanced_at,
        ).select_from(worlds.outerjoin(world_states, world_states.c.world_id == worlds.c.id))

    @staticmethod
    def _world_record(row: Sequence[Any]) -> WorldRecord:
        meta = row[2] if isinstance(row[2], dict) else {"_invalid_meta": row[2]}
        return WorldRecord(row[0], row[1], meta, row[3], row[4], row[5], row[6])

    async def get_world(self, world_id: int, conn: AsyncConnection | None = None) -> WorldRecord:
        """Load one world; raises :class:`WorldNotFoundError`, or :class:`InvalidStoredJSONError`."""
        query = self._world_query().where(worlds.c.id == world_id)
        try:
            if conn is None:
                async with self.engine.connect() as own:
                    row = (await own.execute(query)).first()
            else:
                row = (await conn.execute(query)).first()
        except ValueError as exc:  # json.JSONDecodeError while reading the row
            raise InvalidStoredJSONError(world_id, str(exc)) from None
        if row is None:
            raise WorldNotFoundError(world_id)
        return self._world_record(row)

    async def list_worlds(self) -> list[WorldRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._world_query().order_by(worlds.c.id))).all()
        return [self._world_record(r) for r in rows]

    async def ensure_world_state(self, world_id: int) -> WorldRecord:
        """Create the world's state row at world time 0 if it is missing."""
        async with self.transaction() as conn:
            record = await self.get_world(world_id, conn)
            if record.world_time is None:
                await conn.execute(sa.insert(world_states).values(world_id=world_id))
                record = await self.get_world(world_id, conn)
        return record

    async def discover_active_worlds(self) -> dict[int, int]:
        """Worlds that should tick, with their config versions.

        Active means at least one active session, or ``alwaysOn: true`` in the
        world's simulation config. One query; the JSON flag is read in SQL so
        big behaviour content is never shipped to the daemon for discovery.
        """
        has_session = (
            sa.select(sa.literal(1)).where(sessions.c.world_id == worlds.c.id, sessions.c.active.is_(True)).exists()
        )
        always_on: sa.ColumnElement[Any] = worlds.c.meta["simulation"]["alwaysOn"].as_boolean()
        if self.dialect == "sqlite":
            # SQLite can hold text that is not JSON; json_extract on one such
            # row would fail the whole query and stop discovery of every world.
            always_on = sa.case((sa.func.json_valid(worlds.c.meta) == 1, always_on), else_=sa.false())
        query = sa.select(worlds.c.id, worlds.c.config_version).where(sa.or_(has_session, always_on.is_(True)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {int(r[0]): int(r[1]) for r in rows}

    async def update_world_simulation(
        self, world_id: int, new_simulation: Mapping[str, Any], *, expected_version: int | None = None
    ) -> int:
        """Store a new ``meta["simulation"]`` and bump ``config_version``; returns the new version.

        With ``expected_version`` the update only applies if nobody changed the
        config since (optimistic concurrency); otherwise raises
        :class:`ConfigVersionConflictError`.
        """
        async with self.transaction() as conn:
            current = await self.get_world(world_id, conn)
            if expected_version is not None and current.config_version != expected_version:
                raise ConfigVersionConflictError(world_id, expected_version, current.config_version)
            meta = copy.deepcopy(current.meta)
            meta["simulation"] = copy.deepcopy(dict(new_simulation))
            result = await conn.execute(
                sa.update(worlds)
                .where(worlds.c.id == world_id, worlds.c.config_version == current.config_version)
                .values(meta=meta, config_version=worlds.c.config_version + 1, updated_at=_now())
                .returning(worlds.c.config_version)
            )
            version = result.scalar_one_or_none()
            if version is None:  # lost a race between our read and our write
                latest = await self.get_world(world_id, conn)
                raise ConfigVersionConflictError(world_id, current.config_version, latest.config_version)
        return int(version)

    async def set_world_meta_key(self, world_id: int, key: str, value: Any) -> int:
        """Replace one top-level ``meta`` key (e.g. ``behavior``); bumps ``config_version``."""
        async with self.transaction() as conn:
            current = await self.get_world(world_id, conn)
            meta = copy.deepcopy(current.meta)
            meta[key] = copy.deepcopy(value)
            version = (
                await conn.execute(
                    sa.update(worlds)
                    .where(worlds.c.id == world_id)
                    .values(meta=meta, config_version=worlds.c.config_version + 1, updated_at=_now())
                    .returning(worlds.c.config_version)
                )
            ).scalar_one()
        return int(version)

    # --------------------------------------------------------------- sessions
    async def add_session(
        self,
        world_id: int,
        user_id: str,
        *,
        location: str | None = None,
        scene_npc_ids: Iterable[int] = (),
        involved_npc_ids: Iterable[int] = (),
        active: bool = True,
    ) -> int:
        async with self.transaction() as conn:
            sid = (
                await conn.execute(
                    sa.insert(sessions)
                    .values(
                        world_id=world_id,
                        user_id=user_id,
                        location=location,
                        scene_npc_ids=list(scene_npc_ids),
                        involved_npc_ids=list(involved_npc_ids),
                        active=active,
                    )
                    .returning(sessions.c.id)
                )
            ).scalar_one()
        return int(sid)

    async def set_session_active(self, session_id: int, active: bool) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                sa.update(sessions).where(sessions.c.id == session_id).values(active=active, updated_at=_now())
            )

    async def active_sessions(self, world_id: int, conn: AsyncConnection | None = None) -> list[SessionRecord]:
        query = sa.select(
            sessions.c.id,
            sessions.c.world_id,
            sessions.c.user_id,
            sessions.c.location,
            sessions.c.scene_npc_ids,
            sessions.c.involved_npc_ids,
            sessions.c.active,
        ).where(sessions.c.world_id == world_id, sessions.c.active.is_(True))
        if conn is None:
            async with self.engine.connect() as own:
                rows = (await own.execute(query.order_by(sessions.c.id))).all()
        else:
            rows = (await conn.execute(query.order_by(sessions.c.id))).all()
        return [SessionRecord(r[0], r[1], r[2], r[3], list(r[4] or []), list(r[5] or []), bool(r[6])) for r in rows]

    # ------------------------------------------------------------------ npcs
    async def add_npcs(self, world_id: int, rows: Iterable[Mapping[str, Any]]) -> list[int]:
        """Insert NPCs (dicts of ``npcs`` columns); returns their ids in order."""
        values = [{"state": {}, **dict(r), "world_id": world_id} for r in rows]
        if not values:
            return []
        ids: list[int] = []
        async with self.transaction() as conn:
            for row in values:  # RETURNING with executemany is not portable; seeding is not hot
                ids.append(int((await conn.execute(sa.insert(npcs).values(**row).returning(npcs.c.id))).scalar_one()))
        return ids

    async def set_npc_tiers(self, world_id: int, tiers: Mapping[int, Tier]) -> None:
        """Write tier assignments (only pass the NPCs whose tier changed)."""
        if not tiers:
            return
        async with self.transaction() as conn:
            await conn.execute(
                sa.update(npcs)
                .where(npcs.c.id == sa.bindparam("b_id"), npcs.c.world_id == sa.bindparam("w"))
                .values(tier=sa.bindparam("b_tier")),
                [{"b_id": npc_id, "w": world_id, "b_tier": int(t)} for npc_id, t in tiers.items()],
            )

    async def get_npcs(self, world_id: int, ids: Iterable[int] | None = None) -> list[NpcState]:
        query = sa.select(*_NPC_COLUMNS).where(npcs.c.world_id == world_id)
        if ids is not None:
            query = query.where(npcs.c.id.in_(list(ids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(npcs.c.id))).all()
        return [_npc_from_row(r) for r in rows]

    async def tier_counts(self, world_id: int, conn: AsyncConnection | None = None) -> dict[Tier, int]:
        query = sa.select(npcs.c.tier, sa.func.count()).where(npcs.c.world_id == world_id).group_by(npcs.c.tier)
        if conn is None:
            async with self.engine.connect() as own:
                rows = (await own.execute(query)).all()
        else:
            rows = (await conn.execute(query)).all()
        return {Tier(r[0]): int(r[1]) for r in rows}

    # -------------------------------------------------------- the tick (hot)
    @staticmethod
    async def select_due_npcs(conn: AsyncConnection, world_id: int, world_time: float, limit: int) -> list[NpcState]:
        """At most ``limit`` due NPCs of one world: higher tiers first, most overdue first.

        One statement: a UNION ALL of one index range per tier on
        ``(world_id, tier, next_decision_at)``, each already in due order and
        limited, so the database never reads NPCs that are not due.
        """
        if limit <= 0:
            return []
        parts = [
            sa.select(*_NPC_COLUMNS)
            .where(npcs.c.world_id == world_id, npcs.c.tier == int(t), npcs.c.next_decision_at <= world_time)
            .order_by(npcs.c.next_decision_at, npcs.c.id)
            .limit(limit)
            .subquery()
            for t in SIMULATED_TIERS
        ]
        union = sa.union_all(*(sa.select(p) for p in parts)).subquery()
        query = sa.select(union).order_by(union.c.tier, union.c.next_decision_at, union.c.id).limit(limit)
        rows = (await conn.execute(query)).all()
        return [_npc_from_row(r) for r in rows]

    @staticmethod
    async def write_decisions(conn: AsyncConnection, world_id: int, decisions: Sequence[NpcDecision]) -> None:
        """Write decided NPC columns back (one executemany; ``world_id`` in every WHERE)."""
        if not decisions:
            return
        base = {
            "w": world_id,
        }
        with_state = [d for d in decisions if d.state is not None]
        without_state = [d for d in decisions if d.state is None]
        cols = {
            "next_decision_at": sa.bindparam("b_next"),
            "current_activity": sa.bindparam("b_activity"),
            "activity_started_at": sa.bindparam("b_started"),
            "location": sa.bindparam("b_location"),
            "energy": sa.bindparam("b_energy"),
            "mood_valence": sa.bindparam("b_valence"),
            "mood_arousal": sa.bindparam("b_arousal"),
            "last_decision_at": sa.bindparam("b_decided"),
            "decisions": npcs.c.decisions + 1,
        }

        def params(d: NpcDecision) -> dict[str, Any]:
            p: dict[str, Any] = {
                **base,
                "b_id": d.npc_id,
                "b_next": d.next_decision_at,
                "b_activity": d.current_activity,
                "b_started": d.activity_started_at,
                "b_location": d.location,
                "b_energy": d.energy,
                "b_valence": d.mood_valence,
                "b_arousal": d.mood_arousal,
                "b_decided": d.decided_at,
            }
            if d.state is not None:
                p["b_state"] = d.state
            return p

        where = (npcs.c.id == sa.bindparam("b_id"), npcs.c.world_id == sa.bindparam("w"))
        if without_state:
            await conn.execute(sa.update(npcs).where(*where).values(**cols), [params(d) for d in without_state])
        if with_state:
            await conn.execute(
                sa.update(npcs).where(*where).values(**cols, state=sa.bindparam("b_state", type_=npcs.c.state.type)),
                [params(d) for d in with_state],
            )

    @staticmethod
    async def advance_world_state(
        conn: AsyncConnection,
        world_id: int,
        *,
        world_time: float,
        expected_ticks: int,
        advanced_at: datetime | None = None,
    ) -> None:
        """Move the committed clock, fenced on the tick counter we planned from.

        ``advanced_at`` is the wall time the new world time corresponds to (the
        tick's start), for humans and external checks; default: now.
        Raises :class:`StaleWorldStateError` when the row moved under us, so
        a tick can never be applied twice.
        """
        result = await conn.execute(
            sa.update(world_states)
            .where(world_states.c.world_id == world_id, world_states.c.ticks == expected_ticks)
            .values(world_time=world_time, ticks=world_states.c.ticks + 1, last_advanced_at=advanced_at or _now())
        )
        if result.rowcount != 1:
            raise StaleWorldStateError(
                f"world {world_id}: state row is not at tick {expected_ticks}; refusing to apply the tick"
            )
