"""The one place that builds SQL. Everything above talks to :class:`Store`.

Hot-path functions take an open :class:`AsyncConnection` so the scheduler can
put a whole tick into one transaction; the rest open their own.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.simulation.tiers import NpcPlacement, SessionView
from scheduler_daemon.store import migrate
from scheduler_daemon.store.database import begin_writing, create_engine
from scheduler_daemon.store.models import metadata, npcs, sessions, world_states, worlds

if TYPE_CHECKING:
    from scheduler_daemon.store.leases import Lease


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


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """What tier assignment reads of one NPC, plus its stored tier and activity."""

    placement: NpcPlacement
    tier: Tier
    current_activity: str | None


def _session_view(row: Sequence[Any]) -> SessionView:
    # (id, user_id, location, scene_npc_ids, involved_npc_ids); JSON lists of ids.
    return SessionView(
        id=int(row[0]),
        user_id=str(row[1]),
        location=row[2],
        scene_npc_ids=frozenset(int(i) for i in (row[3] or [])),
        involved_npc_ids=frozenset(int(i) for i in (row[4] or [])),
    )


_SESSION_VIEW_COLUMNS = (
    sessions.c.id,
    sessions.c.user_id,
    sessions.c.location,
    sessions.c.scene_npc_ids,
    sessions.c.involved_npc_ids,
)


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


def _due_one_sql(w: str, t: str, lim: str) -> str:
    """One world's due NPCs: a UNION ALL of one index range per tier, each in due order and limited."""
    per_tier = " UNION ALL ".join(
        f"SELECT * FROM (SELECT {_NPC_COLUMN_NAMES} FROM npcs WHERE world_id = {w} AND tier = {int(tier)} "
        f"AND next_decision_at <= {t} ORDER BY next_decision_at, id LIMIT {lim})"
        for tier in SIMULATED_TIERS
    )
    return f"SELECT * FROM ({per_tier}) ORDER BY tier, next_decision_at, id LIMIT {lim}"


@functools.cache
def _due_many_sqlite(worlds: int) -> sa.TextClause:
    # Prebuilt text per group size: building the equivalent Core constructs
    # for every tick cost more than running the query on SQLite.
    return sa.text(
        " UNION ALL ".join(f"SELECT * FROM ({_due_one_sql(f':w{i}', f':t{i}', f':l{i}')})" for i in range(worlds))
    )


# SQLite refuses compound selects of more than 500 terms.
_SQLITE_WORLDS_PER_SELECT = 400

_NPC_COLUMN_NAMES = ", ".join(c.name for c in _NPC_COLUMNS)


def _due_many_pg() -> sa.TextClause:
    per_tier = " UNION ALL ".join(
        f"(SELECT {_NPC_COLUMN_NAMES} FROM npcs WHERE world_id = q.world_id AND tier = {int(t)} "
        f"AND next_decision_at <= q.now ORDER BY next_decision_at, id LIMIT q.lim)"
        for t in SIMULATED_TIERS
    )
    return sa.text(
        f"SELECT n.* FROM unnest(CAST(:wids AS integer[]), CAST(:nows AS float8[]), CAST(:lims AS integer[])) "
        f"AS q(world_id, now, lim) CROSS JOIN LATERAL ("
        f"SELECT * FROM ({per_tier}) AS u ORDER BY tier, next_decision_at, id LIMIT q.lim) AS n"
    )


_DUE_MANY_PG = _due_many_pg()

# SQLite, in process (no round trips to save): one executemany. A NULL state
# keeps the stored JSON.
_WRITE_DECISION_SQLITE = (
    "UPDATE npcs SET next_decision_at = ?, current_activity = ?, activity_started_at = ?, location = ?, "
    "energy = ?, mood_valence = ?, mood_arousal = ?, last_decision_at = ?, decisions = decisions + 1, "
    "state = COALESCE(?, state) WHERE id = ? AND world_id = ?"
)

# Built once: constructing the statement per tick costs more than running it.
_ADVANCE_WORLD_STATE = (
    sa.update(world_states)
    .where(world_states.c.world_id == sa.bindparam("w"), world_states.c.ticks == sa.bindparam("expected"))
    .values(world_time=sa.bindparam("t"), ticks=world_states.c.ticks + 1, last_advanced_at=sa.bindparam("at"))
)
# The same, fenced on the lease as well (several daemons on PostgreSQL).
_ADVANCE_WORLD_STATE_LEASED = _ADVANCE_WORLD_STATE.where(
    world_states.c.lease_owner == sa.bindparam("owner"), world_states.c.lease_epoch == sa.bindparam("epoch")
)


def _waiting_query() -> sa.CompoundSelect[Any]:
    world = sa.bindparam("w", type_=sa.Integer)
    now = sa.bindparam("now", type_=npcs.c.next_decision_at.type)
    parts = [
        sa.select(sa.literal(int(t)).label("tier"), npcs.c.next_decision_at)
        .where(
            npcs.c.world_id == world,
            npcs.c.tier == int(t),
            npcs.c.next_decision_at <= now,
            sa.tuple_(npcs.c.next_decision_at, npcs.c.id)
            > sa.tuple_(
                sa.bindparam(f"after_at{int(t)}", type_=npcs.c.next_decision_at.type),
                sa.bindparam(f"after_id{int(t)}", type_=sa.Integer),
            ),
        )
        .order_by(npcs.c.next_decision_at, npcs.c.id)
        .limit(1)
        .subquery()
        for t in SIMULATED_TIERS
    ]
    return sa.union_all(*(sa.select(p) for p in parts))


_WAITING_QUERY: Final = _waiting_query()


def _waiting_many_pg() -> sa.TextClause:
    per_tier = " UNION ALL ".join(
        f"(SELECT {int(t)} AS tier, next_decision_at FROM npcs WHERE world_id = q.world_id AND tier = {int(t)} "
        f"AND next_decision_at <= q.now AND (next_decision_at, id) > (q.after_at{int(t)}, q.after_id{int(t)}) "
        f"ORDER BY next_decision_at, id LIMIT 1)"
        for t in SIMULATED_TIERS
    )
    afters = ", ".join(
        f"CAST(:after_at{int(t)} AS float8[]), CAST(:after_id{int(t)} AS integer[])" for t in SIMULATED_TIERS
    )
    columns = ", ".join(f"after_at{int(t)}, after_id{int(t)}" for t in SIMULATED_TIERS)
    return sa.text(
        f"SELECT q.world_id, w.tier, w.next_decision_at FROM unnest(CAST(:wids AS integer[]), "
        f"CAST(:nows AS float8[]), {afters}) AS q(world_id, now, {columns}) CROSS JOIN LATERAL ({per_tier}) AS w"
    )


#: "Nothing taken from this tier yet": before every NPC in ``(next_decision_at, id)`` order.
_BEFORE_ALL: Final = (-math.inf, 0)

# Several worlds' oldest_waiting in one statement (PostgreSQL).
_WAITING_MANY_PG: Final = _waiting_many_pg()

# Does a world have a chain step due / a request it may claim now? One row per
# world; EXISTS stops at the first index hit, however long a backlog is.
_DUE_WORK_BODY = (
    "SELECT q.world_id, "
    "EXISTS (SELECT 1 FROM interaction_chains c WHERE c.world_id = q.world_id AND c.status = 'active' "
    "AND c.next_step_at <= q.now), "
    "EXISTS (SELECT 1 FROM generation_requests g WHERE g.world_id = q.world_id AND g.status = 'pending' "
    "AND (g.not_before IS NULL OR g.not_before <= q.now)) "
)
_DUE_WORK_PG: Final = sa.text(
    _DUE_WORK_BODY + "FROM unnest(CAST(:wids AS integer[]), CAST(:nows AS float8[])) AS q(world_id, now)"
)


@functools.cache
def _due_work_sqlite(worlds: int) -> sa.TextClause:
    values = ", ".join(f"(:w{i}, :t{i})" for i in range(worlds))
    return sa.text(f"WITH q(world_id, now) AS (VALUES {values}) " + _DUE_WORK_BODY + "FROM q")


# Several worlds' clock moves in one statement (PostgreSQL), each fenced like
# _ADVANCE_WORLD_STATE(_LEASED); RETURNING says which rows moved.
_ADVANCE_MANY_PG: Final = sa.text(
    "UPDATE world_states AS ws SET world_time = d.t, ticks = ws.ticks + 1, last_advanced_at = d.at "
    "FROM unnest(CAST(:wids AS integer[]), CAST(:expected AS bigint[]), CAST(:ts AS float8[]), "
    "CAST(:ats AS timestamptz[]), CAST(:owners AS text[]), CAST(:epochs AS bigint[])) "
    "AS d(w, expected, t, at, owner, epoch) "
    "WHERE ws.world_id = d.w AND ws.ticks = d.expected "
    "AND (d.owner IS NULL OR (ws.lease_owner = d.owner AND ws.lease_epoch = d.epoch)) "
    "RETURNING ws.world_id"
)

# Set-based NPC write on PostgreSQL: one UPDATE … FROM jsonb_to_recordset(…)
# for a whole group of worlds instead of one UPDATE per NPC. The rows travel
# as one JSON parameter: psycopg dumps array elements (and parses long
# multi-row VALUES queries) in Python, which cost more than the whole
# statement on the server. A NULL state keeps the stored JSON.
_WRITE_DECISIONS_MANY_PG: Final = sa.text(
    "UPDATE npcs SET next_decision_at = d.next, current_activity = d.activity, activity_started_at = d.started, "
    "location = d.location, energy = d.energy, mood_valence = d.valence, mood_arousal = d.arousal, "
    "last_decision_at = d.decided, decisions = npcs.decisions + 1, state = COALESCE(d.state, npcs.state) "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS d(w integer, id integer, next float8, activity text, "
    "started float8, location text, energy float8, valence float8, arousal float8, decided float8, state jsonb) "
    "WHERE npcs.id = d.id AND npcs.world_id = d.w"
)


# The readiness check's question: would this session's next transaction accept a write?
_WRITABLE_PG: Final = sa.text("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")


@dataclass(frozen=True, slots=True)
class WorldAdvance:
    """One world's fenced clock move at the end of its tick."""

    world_id: int
    world_time: float
    expected_ticks: int  # the tick counter the tick was planned from
    advanced_at: datetime  # wall time the new world time corresponds to
    lease: Lease | None = None  # also fenced on owner + epoch (several daemons)


@dataclass(frozen=True, slots=True)
class DueWork:
    """What a world's tick has to do besides its NPCs (read once per grouped tick)."""

    chains: bool  # an active chain has a step due
    requests: bool  # a pending generation request may be claimed


class Store:
    """Database access for the scheduler (PostgreSQL via psycopg 3, or SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # SQLite's single writer, queued in the event loop (see transaction()).
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

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
        """One writing transaction: committed on normal exit, rolled back on any exception.

        SQLite has one writer at a time: this process's writers queue on a
        lock in the event loop, in order, instead of each polling the file
        lock in SQLite's busy handler (sleeps of up to 100 ms, which made
        concurrent batches of ticks mostly wait). Not reentrant: never open a
        transaction while holding one.
        """
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, begin_writing(self.engine) as conn:
            yield conn

    async def ping(self) -> None:
        """Round-trip to the database (raises on failure)."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def write_refusal(self) -> str | None:
        """Why a write would be refused on a pooled connection now; ``None`` if it would be accepted.

        PostgreSQL: the server is in recovery (a standby), or the session's
        transactions are read-only (``default_transaction_read_only``, as on a
        demoted primary after a failover). Such a connection is invalidated, so
        the next check reconnects (reaching the new primary, and seeing a reset
        setting) even when no tick runs to fail on it. SQLite: a round trip.
        Raises when the database cannot be reached.
        """
        async with self.engine.connect() as conn:
            if self.dialect != "postgresql":
                await conn.execute(sa.text("SELECT 1"))
                return None
            in_recovery, read_only = (await conn.execute(_WRITABLE_PG)).one()
            if not in_recovery and read_only != "on":
                return None
            await conn.invalidate()
            return "in recovery (a standby)" if in_recovery else "read-only transactions"

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
        self,
        world_id: int,
        new_simulation: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        current: WorldRecord | None = None,
    ) -> int:
        """Store a new ``meta["simulation"]`` and bump ``config_version``; returns the new version.

        With ``expected_version`` the update only applies if nobody changed the
        config since (optimistic concurrency); otherwise raises
        :class:`ConfigVersionConflictError`. ``current`` is the world as the
        caller read it at that version (its other ``meta`` keys are kept):
        then the update is a single conditional statement.
        """
        async with self.transaction() as conn:
            if current is None or expected_version is None or current.config_version != expected_version:
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
            if version is None:  # changed (or deleted) between the read and our write
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
            # executemany needs one key set: insert each run of rows with equal keys
            # in one batched INSERT ... RETURNING ("insertmanyvalues"), ids in row order.
            for _, run in itertools.groupby(values, key=lambda r: tuple(sorted(r))):
                insert = sa.insert(npcs).returning(npcs.c.id, sort_by_parameter_order=True)
                ids.extend(int(i) for i in (await conn.execute(insert, list(run))).scalars())
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

    async def active_session_views(self) -> dict[int, list[SessionView]]:
        """Every world's active sessions as tiering sees them, in one query.

        Discovery fingerprints these to notice session changes; only active
        sessions are read (players online), never the NPCs.
        """
        query = (
            sa.select(sessions.c.world_id, *_SESSION_VIEW_COLUMNS)
            .where(sessions.c.active.is_(True))
            .order_by(sessions.c.world_id, sessions.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        out: dict[int, list[SessionView]] = {}
        for row in rows:
            out.setdefault(int(row[0]), []).append(_session_view(row[1:]))
        return out

    @staticmethod
    async def session_views(conn: AsyncConnection, world_id: int) -> list[SessionView]:
        """One world's active sessions as tiering sees them."""
        query = (
            sa.select(*_SESSION_VIEW_COLUMNS)
            .where(sessions.c.world_id == world_id, sessions.c.active.is_(True))
            .order_by(sessions.c.id)
        )
        return [_session_view(r) for r in (await conn.execute(query)).all()]

    @staticmethod
    async def npc_placements(conn: AsyncConnection, world_id: int) -> list[PlacementRecord]:
        """Every NPC of one world with what tiering needs (a few narrow columns)."""
        query = sa.select(npcs.c.id, npcs.c.location, npcs.c.home, npcs.c.tier, npcs.c.current_activity).where(
            npcs.c.world_id == world_id
        )
        return [
            PlacementRecord(NpcPlacement(int(r[0]), r[1], r[2]), Tier(r[3]), r[4])
            for r in (await conn.execute(query)).all()
        ]

    @staticmethod
    async def write_tier_changes(
        conn: AsyncConnection, world_id: int, changes: Mapping[int, tuple[Tier, float | None]]
    ) -> None:
        """Write new tiers: ``{npc_id: (tier, due_by)}``, only for NPCs whose tier changed.

        ``due_by`` (or ``None``) pulls ``next_decision_at`` forward to at most
        that world time (a promoted NPC is decided at its new tier's cadence
        soon), never pushes it back. One executemany, ``world_id`` in every WHERE.
        """
        if not changes:
            return
        due_by = sa.bindparam("b_due", type_=npcs.c.next_decision_at.type)
        await conn.execute(
            sa.update(npcs)
            .where(npcs.c.id == sa.bindparam("b_id"), npcs.c.world_id == sa.bindparam("w"))
            .values(
                tier=sa.bindparam("b_tier"),
                # NULL compares as unknown, so "no due_by" keeps the stored value.
                next_decision_at=sa.case((npcs.c.next_decision_at > due_by, due_by), else_=npcs.c.next_decision_at),
            ),
            [
                {"b_id": npc_id, "w": world_id, "b_tier": int(tier), "b_due": due}
                for npc_id, (tier, due) in changes.items()
            ],
        )

    async def activity_counts(self, world_id: int) -> dict[str | None, int]:
        """How many NPCs of one world do each activity (``None``: not decided yet)."""
        query = (
            sa.select(npcs.c.current_activity, sa.func.count())
            .where(npcs.c.world_id == world_id)
            .group_by(npcs.c.current_activity)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r[0]: int(r[1]) for r in rows}

    # ------------------------------------------------------ world snapshots
    async def export_world(self, world_id: int) -> dict[str, list[dict[str, Any]]]:
        """Every row one world owns, per table (``worlds`` by id, others by ``world_id``).

        Generic over the schema, so tables added later are copied too. Used by
        ``simulate --dry-run`` to run on a private copy.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        async with self.engine.connect() as conn:
            if (await conn.execute(sa.select(worlds.c.id).where(worlds.c.id == world_id))).first() is None:
                raise WorldNotFoundError(world_id)
            for table in metadata.sorted_tables:
                key = table.c.id if table is worlds else table.c.get("world_id")
                if key is None:
                    continue
                order = list(table.primary_key.columns)
                rows = (await conn.execute(sa.select(table).where(key == world_id).order_by(*order))).mappings()
                out[table.name] = [dict(r) for r in rows]
        return out

    async def import_world(self, data: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Insert rows produced by :meth:`export_world` (ids kept) in one transaction."""
        async with self.transaction() as conn:
            for table in metadata.sorted_tables:
                rows = data.get(table.name)
                if rows:
                    await conn.execute(sa.insert(table), [dict(r) for r in rows])

    # -------------------------------------------------------- the tick (hot)
    @staticmethod
    async def select_due_npcs(conn: AsyncConnection, world_id: int, world_time: float, limit: int) -> list[NpcState]:
        """At most ``limit`` due NPCs of one world: higher tiers first, most overdue first.

        One statement: a UNION ALL of one index range per tier on
        ``(world_id, tier, next_decision_at)``, each already in due order and
        limited, so the database never reads NPCs that are not due.
        """
        return (await Store.select_due_npcs_many(conn, [(world_id, world_time, limit)]))[world_id]

    @staticmethod
    async def select_due_npcs_many(
        conn: AsyncConnection, requests: Sequence[tuple[int, float, int]]
    ) -> dict[int, list[NpcState]]:
        """Due NPCs of several worlds in one statement: ``(world_id, world_time, limit)`` each.

        Per world the same rule as :meth:`select_due_npcs`. PostgreSQL: a
        ``LATERAL`` join over ``unnest`` of the requests (one constant
        statement, however many worlds). SQLite: a ``UNION ALL`` of the
        per-world statements, in chunks under its compound-select limit.
        """
        out: dict[int, list[NpcState]] = {world_id: [] for world_id, _, _ in requests}
        wanted = [(w, t, lim) for w, t, lim in requests if lim > 0]
        if not wanted:
            return out
        if conn.dialect.name == "postgresql":
            rows: Sequence[Any] = (
                await conn.execute(
                    _DUE_MANY_PG,
                    {
                        "wids": [w for w, _, _ in wanted],
                        "nows": [float(t) for _, t, _ in wanted],
                        "lims": [lim for _, _, lim in wanted],
                    },
                )
            ).all()
        else:
            rows = []
            for start in range(0, len(wanted), _SQLITE_WORLDS_PER_SELECT):
                chunk = wanted[start : start + _SQLITE_WORLDS_PER_SELECT]
                params: dict[str, Any] = {}
                for i, (w, t, lim) in enumerate(chunk):
                    params[f"w{i}"], params[f"t{i}"], params[f"l{i}"] = w, float(t), lim
                rows.extend((await conn.execute(_due_many_sqlite(len(chunk)), params)).all())
        for row in rows:
            out[row[1]].append(_npc_from_row(row))
        return out

    @staticmethod
    async def due_work_many(conn: AsyncConnection, requests: Sequence[tuple[int, float]]) -> dict[int, DueWork]:
        """Per ``(world_id, world_time)``: whether chains or generation claims have anything to do.

        One statement for a whole group, so a tick skips the chain and claim
        queries of every world with nothing due (most worlds, most ticks).
        """
        if not requests:
            return {}
        if conn.dialect.name == "postgresql":
            params: dict[str, Any] = {"wids": [w for w, _ in requests], "nows": [float(t) for _, t in requests]}
            rows: list[Any] = list((await conn.execute(_DUE_WORK_PG, params)).all())
        else:
            rows = []
            for start in range(0, len(requests), _SQLITE_WORLDS_PER_SELECT):
                chunk = requests[start : start + _SQLITE_WORLDS_PER_SELECT]
                params = {}
                for i, (w, t) in enumerate(chunk):
                    params[f"w{i}"], params[f"t{i}"] = w, float(t)
                rows.extend((await conn.execute(_due_work_sqlite(len(chunk)), params)).all())
        return {int(r[0]): DueWork(chains=bool(r[1]), requests=bool(r[2])) for r in rows}

    @staticmethod
    async def oldest_waiting(
        conn: AsyncConnection, world_id: int, world_time: float, taken: Mapping[Tier, tuple[float, int]]
    ) -> dict[Tier, float]:
        """Per simulated tier, ``next_decision_at`` of the most overdue NPC left waiting.

        ``taken`` is, per tier, ``(next_decision_at, id)`` of the last NPC this
        tick took (see :func:`last_taken`); they are the first ones in that
        order, so the oldest one left is the next one after it: one index
        descent per tier, however many were taken. Tiers with nobody waiting
        are absent.
        """
        params: dict[str, Any] = {"w": world_id, "now": world_time}
        for t in SIMULATED_TIERS:
            params[f"after_at{int(t)}"], params[f"after_id{int(t)}"] = taken.get(t, _BEFORE_ALL)
        return {Tier(r[0]): float(r[1]) for r in (await conn.execute(_WAITING_QUERY, params)).all()}

    @staticmethod
    async def oldest_waiting_many(
        conn: AsyncConnection, requests: Sequence[tuple[int, float, Mapping[Tier, tuple[float, int]]]]
    ) -> dict[int, dict[Tier, float]]:
        """:meth:`oldest_waiting` for several ``(world_id, world_time, taken)``: one statement on PostgreSQL."""
        out: dict[int, dict[Tier, float]] = {world_id: {} for world_id, _, _ in requests}
        if not requests:
            return out
        if conn.dialect.name != "postgresql":
            for world_id, world_time, taken in requests:
                out[world_id] = await Store.oldest_waiting(conn, world_id, world_time, taken)
            return out
        params: dict[str, Any] = {"wids": [w for w, _, _ in requests], "nows": [float(t) for _, t, _ in requests]}
        for t in SIMULATED_TIERS:
            afters = [taken.get(t, _BEFORE_ALL) for _, _, taken in requests]
            params[f"after_at{int(t)}"] = [float(at) for at, _ in afters]
            params[f"after_id{int(t)}"] = [npc_id for _, npc_id in afters]
        for world_id, tier, next_at in (await conn.execute(_WAITING_MANY_PG, params)).all():
            out[int(world_id)][Tier(tier)] = float(next_at)
        return out

    @staticmethod
    async def write_decisions(conn: AsyncConnection, world_id: int, decisions: Sequence[NpcDecision]) -> None:
        """Write one world's decided NPC columns back (see :meth:`write_decisions_many`)."""
        await Store.write_decisions_many(conn, [(world_id, decisions)])

    @staticmethod
    async def write_decisions_many(conn: AsyncConnection, batches: Sequence[tuple[int, Sequence[NpcDecision]]]) -> None:
        """Write decided NPC columns back for several worlds (``world_id`` in every WHERE).

        PostgreSQL: one set-based ``UPDATE … FROM jsonb_to_recordset(…)`` for
        all of them. SQLite (in process, no round trips to save): one executemany.
        """
        if conn.dialect.name == "postgresql":
            rows: list[Any] = [
                {
                    "w": world_id,
                    "id": d.npc_id,
                    "next": d.next_decision_at,
                    "activity": d.current_activity,
                    "started": d.activity_started_at,
                    "location": d.location,
                    "energy": d.energy,
                    "valence": d.mood_valence,
                    "arousal": d.mood_arousal,
                    "decided": d.decided_at,
                    "state": d.state,
                }
                for world_id, decisions in batches
                for d in decisions
            ]
            if rows:
                # allow_nan=False: a non-finite value from a plug-in decide fails with a clear error.
                await conn.execute(_WRITE_DECISIONS_MANY_PG, {"rows": json.dumps(rows, allow_nan=False)})
            return
        rows = [
            (
                d.next_decision_at,
                d.current_activity,
                d.activity_started_at,
                d.location,
                d.energy,
                d.mood_valence,
                d.mood_arousal,
                d.decided_at,
                None if d.state is None else json.dumps(d.state, allow_nan=False),
                d.npc_id,
                world_id,
            )
            for world_id, decisions in batches
            for d in decisions
        ]
        if rows:
            await conn.exec_driver_sql(_WRITE_DECISION_SQLITE, rows)

    @staticmethod
    async def advance_world_states(conn: AsyncConnection, advances: Sequence[WorldAdvance]) -> None:
        """:meth:`advance_world_state` for several worlds: one statement on PostgreSQL.

        Raises :class:`StaleWorldStateError` naming every world whose row did
        not move (the caller rolls the group back and isolates them).
        """
        if len(advances) == 1 or conn.dialect.name != "postgresql":
            for a in advances:
                await Store.advance_world_state(
                    conn,
                    a.world_id,
                    world_time=a.world_time,
                    expected_ticks=a.expected_ticks,
                    advanced_at=a.advanced_at,
                    lease=a.lease,
                )
            return
        params = {
            "wids": [a.world_id for a in advances],
            "expected": [a.expected_ticks for a in advances],
            "ts": [float(a.world_time) for a in advances],
            "ats": [a.advanced_at for a in advances],
            "owners": [a.lease.owner if a.lease is not None else None for a in advances],
            "epochs": [a.lease.epoch if a.lease is not None else None for a in advances],
        }
        moved = {int(r[0]) for r in (await conn.execute(_ADVANCE_MANY_PG, params)).all()}
        stale = [a.world_id for a in advances if a.world_id not in moved]
        if stale:
            raise StaleWorldStateError(
                f"worlds {stale}: state row not at the planned tick (or lease lost); refusing to apply their ticks"
            )

    @staticmethod
    async def advance_world_state(
        conn: AsyncConnection,
        world_id: int,
        *,
        world_time: float,
        expected_ticks: int,
        advanced_at: datetime | None = None,
        lease: Lease | None = None,
    ) -> None:
        """Move the committed clock, fenced on the tick counter we planned from.

        ``advanced_at`` is the wall time the new world time corresponds to (the
        tick's start), for humans and external checks; default: now.
        With a ``lease`` (several daemons on PostgreSQL) the update is also
        conditional on ``lease_owner = me AND lease_epoch = my epoch``.
        Raises :class:`StaleWorldStateError` when the row moved under us, so
        a tick can never be applied twice (the caller's transaction, with the
        tick's NPC writes, then rolls back).
        """
        params: dict[str, Any] = {
            "w": world_id,
            "expected": expected_ticks,
            "t": world_time,
            "at": advanced_at or _now(),
        }
        statement = _ADVANCE_WORLD_STATE
        if lease is not None:
            statement = _ADVANCE_WORLD_STATE_LEASED
            params.update(owner=lease.owner, epoch=lease.epoch)
        result = await conn.execute(statement, params)
        if result.rowcount != 1:
            raise StaleWorldStateError(
                f"world {world_id}: state row is not at tick {expected_ticks}"
                + (f" with lease (owner {lease.owner!r}, epoch {lease.epoch})" if lease is not None else "")
                + "; refusing to apply the tick"
            )
