"""The one place that builds SQL. Everything above talks to :class:`Store`.

Hot-path functions take an open :class:`AsyncConnection` so the scheduler can
put a whole tick into one transaction; the rest open their own.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.simulation.tiers import NpcPlacement, SessionView
from scheduler_daemon.store import migrate
from scheduler_daemon.store.database import begin_writing, create_engine
from scheduler_daemon.store.errors import (
    ConfigVersionConflictError,
    InvalidStoredWorldError,
    StaleWorldStateError,
    WorldNotFoundError,
)
from scheduler_daemon.store.fence import Fence
from scheduler_daemon.store.models import metadata, npcs, sessions, world_states, worlds

#: A world's ``meta`` larger than this (bytes of its JSON text) is never loaded:
#: the world is isolated with the reason instead.
MAX_WORLD_META_BYTES: Final = 4 * 1024 * 1024
#: An NPC's ``state`` larger than this is never loaded: the NPC is quarantined.
MAX_NPC_STATE_BYTES: Final = 256 * 1024


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _shown(value: Any) -> str:
    """A stored value for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


#: Ids per ``IN (…)`` list: SQLite binds one parameter each and allows 32,766.
_IDS_PER_STATEMENT: Final = 1000


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class WorldRecord:
    """A ``worlds`` row joined with its state row (state may not exist yet).

    ``problem`` says why the stored row cannot be used (then ``meta`` is empty);
    see :meth:`require_valid`.
    """

    id: int
    name: str
    meta: dict[str, Any]
    config_version: int
    world_time: float | None
    ticks: int | None
    last_advanced_at: datetime | None
    problem: str | None = None

    @property
    def simulation_raw(self) -> Any:
        return self.meta.get("simulation")

    def require_valid(self) -> WorldRecord:
        """This record, or :class:`InvalidStoredWorldError` naming the world and the bad field."""
        if self.problem is not None:
            raise InvalidStoredWorldError(self.id, self.problem)
        return self


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """What tier assignment reads of one NPC, plus its stored tier and activity.

    ``tier`` is ``None`` when the stored value is no tier; ``problem`` says why
    the NPC cannot be decided (it is quarantined), ``None`` when it can.
    """

    placement: NpcPlacement
    tier: Tier | None
    current_activity: str | None
    problem: str | None = None


_TIER_VALUES: Final = frozenset(int(t) for t in Tier)


@dataclass(frozen=True, slots=True)
class ActiveSessions:
    """Active sessions as tiering sees them, by world, and the rows it could not read."""

    views: dict[int, list[SessionView]]
    ignored: list[IgnoredSession]


def _active_sessions(rows: Iterable[Sequence[Any]], dialect: str) -> ActiveSessions:
    """(world_id, *session view columns) rows, each checked on its own."""
    out = ActiveSessions({}, [])
    for row in rows:
        view = _session_view(row[1:], dialect)
        if isinstance(view, SessionView):
            out.views.setdefault(int(row[0]), []).append(view)
        else:
            out.ignored.append(IgnoredSession(int(row[1]), int(row[0]), view))
    return out


@dataclass(frozen=True, slots=True)
class IgnoredSession:
    """An active session row tiering cannot read (it is left out of tier assignment, and reported)."""

    session_id: int
    world_id: int
    problem: str


def _npc_ids(raw: Any, field: str, dialect: str) -> tuple[frozenset[int] | None, str | None]:
    """A session's JSON list of NPC ids, or the problem naming ``field``."""
    if raw is None:
        return frozenset(), None
    if isinstance(raw, str) and dialect == "sqlite":
        try:
            raw = json.loads(raw)
        except ValueError:
            return None, f"{field}: stored value is not valid JSON"
    if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        return None, f"{field}: expected a JSON array of NPC ids, got {_shown(raw)}"
    return frozenset(raw), None


def _session_view(row: Sequence[Any], dialect: str) -> SessionView | str:
    """(id, user_id, location, scene_npc_ids, involved_npc_ids) as tiering sees it, or what is wrong with it."""
    scene, problem = _npc_ids(row[3], "scene_npc_ids", dialect)
    involved, problem2 = _npc_ids(row[4], "involved_npc_ids", dialect)
    if scene is None or involved is None:
        return problem or problem2 or "unreadable"
    if row[2] is not None and not isinstance(row[2], str):
        return f"location: expected text, got {_shown(row[2])}"
    return SessionView(
        id=int(row[0]), user_id=str(row[1]), location=row[2], scene_npc_ids=scene, involved_npc_ids=involved
    )


def _session_view_columns(dialect: str) -> tuple[sa.ColumnElement[Any], ...]:
    # SQLite: the JSON lists as raw text, decoded row by row (_session_view).
    lists: tuple[sa.ColumnElement[Any], ...] = (sessions.c.scene_npc_ids, sessions.c.involved_npc_ids)
    if dialect == "sqlite":
        lists = (
            sa.type_coerce(sessions.c.scene_npc_ids, sa.Text).label("scene_npc_ids"),
            sa.type_coerce(sessions.c.involved_npc_ids, sa.Text).label("involved_npc_ids"),
        )
    return (sessions.c.id, sessions.c.user_id, sessions.c.location, *lists)


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


@dataclass(frozen=True, slots=True)
class QuarantinedNpc:
    """An NPC row the daemon cannot decide; ``problem`` names the field and what is wrong."""

    npc_id: int
    world_id: int
    problem: str


@dataclass(frozen=True, slots=True)
class DueNpcs:
    """The due NPCs of several worlds, by world: the ones to decide, and the rows quarantined on the way."""

    npcs: dict[int, list[NpcState]]
    quarantined: dict[int, list[QuarantinedNpc]]


_NUMBER_FIELDS = ((4, "next_decision_at"), (10, "energy"), (11, "mood_valence"), (12, "mood_arousal"))
_OPTIONAL_NUMBER_FIELDS = ((9, "activity_started_at"), (13, "last_decision_at"))
_OPTIONAL_TEXT_FIELDS = ((5, "location"), (6, "home"), (7, "routine"), (8, "current_activity"))


def _npc_problem(row: Sequence[Any]) -> str | None:
    """What makes a loaded NPC row undecidable (SQLite keeps any value in any column), or ``None``."""
    for i, name in _NUMBER_FIELDS:
        if not _is_number(row[i]):
            return f"{name}: expected a finite number, got {_shown(row[i])}"
    for i, name in _OPTIONAL_NUMBER_FIELDS:
        if row[i] is not None and not _is_number(row[i]):
            return f"{name}: expected a finite number or null, got {_shown(row[i])}"
    for i, name in _OPTIONAL_TEXT_FIELDS:
        if row[i] is not None and not isinstance(row[i], str):
            return f"{name}: expected text or null, got {_shown(row[i])}"
    if not isinstance(row[14], int) or isinstance(row[14], bool):
        return f"decisions: expected an integer, got {_shown(row[14])}"
    return None


def _npc_from_row(row: Sequence[Any], dialect: str) -> NpcState | QuarantinedNpc:
    """One loaded NPC row, checked: an :class:`NpcState`, or why it must not be decided.

    ``state`` comes as decoded JSON (PostgreSQL), raw text (SQLite), or NULL
    when it is over :data:`MAX_NPC_STATE_BYTES` (the selection leaves it in the database).
    """
    state = row[15]
    problem = None
    if state is None:
        problem = f"state: larger than the limit of {MAX_NPC_STATE_BYTES} bytes"
    elif isinstance(state, str) and dialect == "sqlite":
        try:
            state = json.loads(state)
        except ValueError:
            problem = "state: stored value is not valid JSON"
    if problem is None and not isinstance(state, dict):
        problem = f"state: expected a JSON object, got {json_type_name(state)}"
    problem = problem or _npc_problem(row)
    if problem is not None:
        return QuarantinedNpc(int(row[0]), int(row[1]), problem)
    return NpcState(
        id=row[0],
        world_id=row[1],
        name=str(row[2]),
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
        state=state,
    )


def _npc_problem_sql(dialect: str) -> str:
    """SQL text: why an NPC row cannot be decided (NULL when it can), for scans that must not load ``state``.

    The same rules as :func:`_npc_from_row`, checked without shipping the rows.
    """
    if dialect == "postgresql":  # typed columns: only the JSON can be wrong
        return (
            "CASE WHEN jsonb_typeof(state) <> 'object' "
            "THEN 'state: expected a JSON object, got ' || jsonb_typeof(state) "
            f"WHEN octet_length(state::text) > {MAX_NPC_STATE_BYTES} "
            f"THEN 'state: larger than the limit of {MAX_NPC_STATE_BYTES} bytes' END"
        )
    checks = [
        *(
            f"WHEN typeof({name}) NOT IN ('integer', 'real') "
            f"THEN '{name}: expected a finite number, got ' || typeof({name})"
            for _, name in _NUMBER_FIELDS
        ),
        *(
            f"WHEN typeof({name}) NOT IN ('integer', 'real', 'null') "
            f"THEN '{name}: expected a finite number or null, got ' || typeof({name})"
            for _, name in _OPTIONAL_NUMBER_FIELDS
        ),
        *(
            f"WHEN typeof({name}) NOT IN ('text', 'null') THEN '{name}: expected text or null, got ' || typeof({name})"
            for _, name in _OPTIONAL_TEXT_FIELDS
        ),
        "WHEN typeof(decisions) <> 'integer' THEN 'decisions: expected an integer, got ' || typeof(decisions)",
        f"WHEN length(state) > {MAX_NPC_STATE_BYTES} "
        f"THEN 'state: larger than the limit of {MAX_NPC_STATE_BYTES} bytes'",
        "WHEN NOT json_valid(state) THEN 'state: stored value is not valid JSON'",
        "WHEN json_type(state) <> 'object' THEN 'state: expected a JSON object, got ' || json_type(state)",
    ]
    return "CASE " + " ".join(checks) + " END"


def _due_one_sql(w: str, t: str, lim: str) -> str:
    """One world's due NPCs: a UNION ALL of one index range per tier, each in due order and limited."""
    per_tier = " UNION ALL ".join(
        f"SELECT * FROM (SELECT {_selected_npc_columns('sqlite')} FROM npcs WHERE world_id = {w} "
        f"AND tier = {int(tier)} "
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


def _selected_npc_columns(dialect: str) -> str:
    """The NPC columns the tick reads; ``state`` NULL when over the limit, so it never leaves the database.

    PostgreSQL: an uncompressed value's stored size is read without touching
    it; only a compressed one (large by definition) is measured as text.
    """
    if dialect == "postgresql":
        small = f"pg_column_compression(state) IS NULL AND pg_column_size(state) <= {MAX_NPC_STATE_BYTES}"
        fits = f"{small} OR octet_length(state::text) <= {MAX_NPC_STATE_BYTES}"
    else:
        fits = f"length(state) <= {MAX_NPC_STATE_BYTES}"
    guarded = f"CASE WHEN {fits} THEN state END AS state"
    return ", ".join(guarded if c.name == "state" else c.name for c in _NPC_COLUMNS)


def _due_many_pg() -> sa.TextClause:
    per_tier = " UNION ALL ".join(
        f"(SELECT {_selected_npc_columns('postgresql')} FROM npcs WHERE world_id = q.world_id AND tier = {int(t)} "
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
    fence: Fence | None = None  # also fenced on the lease's owner + epoch (several daemons)


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
        """Raise :class:`~scheduler_daemon.store.errors.SchemaNotMigratedError` if behind."""
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
        """A world with its state row; ``meta`` only if within :data:`MAX_WORLD_META_BYTES`, and its size."""
        if self.dialect == "postgresql":
            size: sa.ColumnElement[Any] = sa.func.octet_length(sa.cast(worlds.c.meta, sa.Text))
            meta: sa.ColumnElement[Any] = sa.case((size <= MAX_WORLD_META_BYTES, worlds.c.meta))
            advanced: sa.ColumnElement[Any] = world_states.c.last_advanced_at
        else:
            # Raw text, decoded row by row (_world_record): SQLite holds any
            # value in any column, and one undecodable row must not fail a query of many.
            size = sa.func.length(sa.cast(worlds.c.meta, sa.LargeBinary))
            meta = sa.case((size <= MAX_WORLD_META_BYTES, sa.type_coerce(worlds.c.meta, sa.Text)))
            advanced = sa.type_coerce(world_states.c.last_advanced_at, sa.Text)
        return sa.select(
            worlds.c.id,
            worlds.c.name,
            meta,
            size,
            worlds.c.config_version,
            world_states.c.world_time,
            world_states.c.ticks,
            advanced,
        ).select_from(worlds.outerjoin(world_states, world_states.c.world_id == worlds.c.id))

    def _world_record(self, row: Sequence[Any]) -> WorldRecord:
        """Check one row's values; a bad one makes the record's ``problem`` (naming the field), never an exception."""
        world_id, name, meta, size, version, world_time, ticks, advanced = row
        problems: list[str] = []
        if meta is None:
            problems.append(f"meta: {size} bytes stored, larger than the limit of {MAX_WORLD_META_BYTES} bytes")
        elif isinstance(meta, str) and self.dialect == "sqlite":
            try:
                meta = json.loads(meta)
            except ValueError as exc:
                problems.append(f"meta: stored value is not valid JSON ({exc})")
        if not problems and not isinstance(meta, dict):
            problems.append(f"meta: expected a JSON object, got {json_type_name(meta)}")
        if not isinstance(version, int) or isinstance(version, bool):
            problems.append(f"config_version: expected an integer, got {_shown(version)}")
            version = 0
        if world_time is not None and not _is_number(world_time):
            problems.append(f"world_states.world_time: expected a finite number, got {_shown(world_time)}")
            world_time = None
        if ticks is not None and (not isinstance(ticks, int) or isinstance(ticks, bool) or ticks < 0):
            problems.append(f"world_states.ticks: expected a non-negative integer, got {_shown(ticks)}")
            ticks = None
        if isinstance(advanced, str):
            try:
                advanced = datetime.fromisoformat(advanced)
            except ValueError:
                problems.append(f"world_states.last_advanced_at: not a timestamp: {_shown(advanced)}")
                advanced = None
        return WorldRecord(
            int(world_id),
            str(name),
            meta if not problems else {},
            version,
            None if world_time is None else float(world_time),
            ticks,
            advanced,
            "; ".join(problems) or None,
        )

    async def get_world(self, world_id: int, conn: AsyncConnection | None = None) -> WorldRecord:
        """Load one world (its ``problem`` set if the stored row is unusable); raises :class:`WorldNotFoundError`."""
        query = self._world_query().where(worlds.c.id == world_id)
        if conn is None:
            async with self.engine.connect() as own:
                row = (await own.execute(query)).first()
        else:
            row = (await conn.execute(query)).first()
        if row is None:
            raise WorldNotFoundError(world_id)
        return self._world_record(row)

    async def list_worlds(self, world_ids: Collection[int] | None = None) -> list[WorldRecord]:
        """Every world (or those of ``world_ids``) in id order, each checked on its own (see ``problem``)."""
        query = self._world_query().order_by(worlds.c.id)
        if world_ids is None:
            async with self.engine.connect() as conn:
                return [self._world_record(r) for r in (await conn.execute(query)).all()]
        out: list[WorldRecord] = []
        ids = sorted(world_ids)
        async with self.engine.connect() as conn:
            for start in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = query.where(worlds.c.id.in_(ids[start : start + _IDS_PER_STATEMENT]))
                out += [self._world_record(r) for r in (await conn.execute(chunk)).all()]
        return out

    async def world_names(self, world_ids: Collection[int]) -> dict[int, str]:
        """Names of the given worlds (one narrow query; ``meta`` is never read)."""
        if not world_ids:
            return {}
        query = sa.select(worlds.c.id, worlds.c.name).where(worlds.c.id.in_(sorted(world_ids)))
        async with self.engine.connect() as conn:
            return {int(r[0]): str(r[1]) for r in (await conn.execute(query)).all()}

    @staticmethod
    async def create_missing_states(conn: AsyncConnection, world_ids: Collection[int]) -> list[int]:
        """Insert a state row at world time 0 for each of ``world_ids`` that has none; returns those worlds."""
        if not world_ids:
            return []
        insert = postgresql.insert(world_states) if conn.dialect.name == "postgresql" else sqlite.insert(world_states)
        statement = (
            insert.from_select(["world_id"], sa.select(worlds.c.id).where(worlds.c.id.in_(sorted(world_ids))))
            .on_conflict_do_nothing(index_elements=[world_states.c.world_id])
            .returning(world_states.c.world_id)
        )
        return sorted(int(w) for w in (await conn.execute(statement)).scalars())

    async def load_worlds(self, conn: AsyncConnection, world_ids: Collection[int]) -> dict[int, WorldRecord]:
        """The given worlds (those that exist), each checked on its own, in one query."""
        query = self._world_query().where(worlds.c.id.in_(sorted(world_ids)))
        return {record.id: record for record in map(self._world_record, (await conn.execute(query)).all())}

    @staticmethod
    async def restore_world_state(
        conn: AsyncConnection,
        world_id: int,
        *,
        world_time: float,
        ticks: int,
        advanced_at: datetime | None,
        lease_columns: Mapping[str, Any] | None = None,
    ) -> bool:
        """Recreate a deleted state row at the given clock; False if a row exists (nothing written).

        ``lease_columns`` (see :func:`scheduler_daemon.store.leases.lease_columns`)
        puts the lease the caller holds on the new row.
        """
        values: dict[str, Any] = {
            "world_id": world_id,
            "world_time": world_time,
            "ticks": ticks,
            "last_advanced_at": advanced_at,
            **(lease_columns or {}),
        }
        insert = postgresql.insert(world_states) if conn.dialect.name == "postgresql" else sqlite.insert(world_states)
        statement = (
            insert.values(**values)
            .on_conflict_do_nothing(index_elements=[world_states.c.world_id])
            .returning(world_states.c.world_id)
        )
        return (await conn.execute(statement)).first() is not None

    async def discover_active_worlds(self) -> dict[int, int]:
        """Worlds that should tick, and worlds whose row cannot be judged, with their config versions.

        Active means at least one active session, or ``alwaysOn: true`` (a JSON
        boolean) in the world's simulation config. One query; the flag is read
        in SQL, so big behaviour content never travels for discovery. Every
        value is type-checked in SQL row by row (``jsonb_typeof``, ``json_valid``),
        so no row can fail the query: a world whose ``meta``, ``simulation`` or
        ``alwaysOn`` has the wrong type (or whose meta is not JSON) is returned
        too, and registering it isolates it with the reason.
        """
        has_session = (
            sa.select(sa.literal(1)).where(sessions.c.world_id == worlds.c.id, sessions.c.active.is_(True)).exists()
        )
        sim_type: sa.ColumnElement[Any]
        flag_type: sa.ColumnElement[Any]
        if self.dialect == "postgresql":
            meta_type = sa.func.jsonb_typeof(worlds.c.meta)
            sim_type = sa.func.jsonb_typeof(sa.literal_column("worlds.meta -> 'simulation'"))
            flag_type = sa.func.jsonb_typeof(sa.literal_column("worlds.meta -> 'simulation' -> 'alwaysOn'"))
            always_on = sa.and_(
                flag_type == "boolean", sa.literal_column("worlds.meta -> 'simulation' ->> 'alwaysOn'") == "true"
            )
            suspect = sa.or_(
                meta_type != "object",
                sim_type.not_in(["object", "null"]),
                flag_type.not_in(["boolean", "null"]),
            )
        else:
            valid = sa.func.json_valid(worlds.c.meta) == 1
            sim_type = sa.case((valid, sa.func.json_type(worlds.c.meta, "$.simulation")))
            flag_type = sa.case((valid, sa.func.json_type(worlds.c.meta, "$.simulation.alwaysOn")))
            always_on = flag_type == "true"
            # Every JSON function behind CASE WHEN json_valid: SQL does not promise
            # to stop an OR early, and json_type of malformed text fails the query.
            suspect = sa.or_(
                sa.not_(valid),
                sa.case((valid, sa.func.json_type(worlds.c.meta))) != "object",
                sim_type.not_in(["object", "null"]),
                flag_type.not_in(["true", "false", "null"]),
            )
        query = sa.select(worlds.c.id, worlds.c.config_version).where(
            sa.or_(has_session, sa.func.coalesce(always_on, sa.false()), sa.func.coalesce(suspect, sa.false()))
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        # A version that is not an integer (SQLite) still discovers the world; loading it reports the field.
        return {int(r[0]): r[1] if isinstance(r[1], int) else -1 for r in rows}

    async def change_world_simulation(
        self,
        world_id: int,
        change: Callable[[WorldRecord], Mapping[str, Any] | None],
        *,
        expected_version: int | None = None,
    ) -> WorldRecord:
        """Read-modify-write ``meta["simulation"]`` under the world's row lock; returns the record as stored.

        ``change`` gets the current record and returns the new simulation config,
        or ``None`` to leave it as it is (no version bump). It runs inside the
        transaction, which holds the row (``FOR UPDATE``; SQLite: the write
        lock), so concurrent writers of one world are serialized and each
        merges into the latest version: nothing is lost and nothing conflicts.
        With ``expected_version`` a different stored version raises
        :class:`ConfigVersionConflictError` (the caller's If-Match). A stored
        row that cannot be used raises :class:`InvalidStoredWorldError`, an
        exception from ``change`` rolls back.
        """
        query = self._world_query().where(worlds.c.id == world_id)
        if self.dialect == "postgresql":
            query = query.with_for_update(of=worlds)
        async with self.transaction() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                raise WorldNotFoundError(world_id)
            current = self._world_record(row).require_valid()
            if expected_version is not None and current.config_version != expected_version:
                raise ConfigVersionConflictError(world_id, expected_version, current.config_version)
            new_simulation = change(current)
            if new_simulation is None:
                return current
            meta = copy.deepcopy(current.meta)
            meta["simulation"] = copy.deepcopy(dict(new_simulation))
            version = (
                await conn.execute(
                    sa.update(worlds)
                    .where(worlds.c.id == world_id)
                    .values(meta=meta, config_version=worlds.c.config_version + 1, updated_at=_now())
                    .returning(worlds.c.config_version)
                )
            ).scalar_one()
        return dataclasses.replace(current, meta=meta, config_version=int(version))

    async def update_world_simulation(
        self, world_id: int, new_simulation: Mapping[str, Any], *, expected_version: int | None = None
    ) -> int:
        """Store a new ``meta["simulation"]`` (see :meth:`change_world_simulation`); returns the new version."""
        record = await self.change_world_simulation(
            world_id, lambda _: new_simulation, expected_version=expected_version
        )
        return record.config_version

    async def set_world_meta_key(self, world_id: int, key: str, value: Any) -> int:
        """Replace one top-level ``meta`` key (e.g. ``behavior``); bumps ``config_version``."""
        async with self.transaction() as conn:
            current = (await self.get_world(world_id, conn)).require_valid()
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

    async def count_active_sessions(self, world_id: int) -> int:
        """How many active sessions (players online) a world has."""
        query = sa.select(sa.func.count()).where(sessions.c.world_id == world_id, sessions.c.active.is_(True))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

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
        """The world's NPCs (or those of ``ids``) that can be decided; quarantined rows are left out."""
        query = (
            sa.select(sa.text(_selected_npc_columns(self.dialect))).select_from(npcs).where(npcs.c.world_id == world_id)
        )
        if ids is not None:
            query = query.where(npcs.c.id.in_(list(ids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(npcs.c.id))).all()
        return [npc for npc in (_npc_from_row(r, self.dialect) for r in rows) if isinstance(npc, NpcState)]

    async def npc_problems(self, world_id: int) -> dict[int, str]:
        """The world's NPC rows that cannot be decided, with the reason (the quarantine, read from the database)."""
        problem = sa.text(_npc_problem_sql(self.dialect))
        query = sa.select(npcs.c.id, problem).select_from(npcs).where(npcs.c.world_id == world_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(npcs.c.id))).all()
        return {int(r[0]): str(r[1]) for r in rows if r[1] is not None}

    async def tier_counts(self, world_id: int, conn: AsyncConnection | None = None) -> dict[Tier, int]:
        """NPCs of one world per stored tier (a value that is no tier is not counted)."""
        query = sa.select(npcs.c.tier, sa.func.count()).where(npcs.c.world_id == world_id).group_by(npcs.c.tier)
        if conn is None:
            async with self.engine.connect() as own:
                rows = (await own.execute(query)).all()
        else:
            rows = (await conn.execute(query)).all()
        return {Tier(r[0]): int(r[1]) for r in rows if r[0] in _TIER_VALUES}

    async def active_session_views(self) -> ActiveSessions:
        """Every world's active sessions as tiering sees them, in one query.

        Discovery fingerprints these to notice session changes; only active
        sessions are read (players online), never the NPCs. A row tiering
        cannot read is left out and reported (``ignored``), never fails the query.
        """
        query = sa.select(sessions.c.world_id, *_session_view_columns(self.dialect)).where(sessions.c.active.is_(True))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(sessions.c.world_id, sessions.c.id))).all()
        return _active_sessions(rows, self.dialect)

    @staticmethod
    async def session_views_many(conn: AsyncConnection, world_ids: Collection[int]) -> ActiveSessions:
        """The active sessions of the given worlds as tiering sees them (see :meth:`active_session_views`)."""
        dialect = conn.dialect.name
        query = (
            sa.select(sessions.c.world_id, *_session_view_columns(dialect))
            .where(sessions.c.world_id.in_(sorted(world_ids)), sessions.c.active.is_(True))
            .order_by(sessions.c.world_id, sessions.c.id)
        )
        return _active_sessions((await conn.execute(query)).all(), dialect)

    @staticmethod
    async def npc_placements_many(
        conn: AsyncConnection, world_ids: Collection[int]
    ) -> dict[int, list[PlacementRecord]]:
        """Every NPC of the given worlds with what tiering needs, and why it cannot be decided (if so).

        A few narrow columns and a row check in SQL (:func:`_npc_problem_sql`):
        ``state`` itself never leaves the database here.
        """
        out: dict[int, list[PlacementRecord]] = {w: [] for w in world_ids}
        problem = sa.text(_npc_problem_sql(conn.dialect.name))
        query = (
            sa.select(
                npcs.c.world_id, npcs.c.id, npcs.c.location, npcs.c.home, npcs.c.tier, npcs.c.current_activity, problem
            )
            .select_from(npcs)
            .where(npcs.c.world_id.in_(sorted(world_ids)))
        )
        for world_id, npc_id, location, home, tier, activity, why in (await conn.execute(query)).all():
            placement = NpcPlacement(
                int(npc_id),
                location if isinstance(location, str) else None,
                home if isinstance(home, str) else None,
            )
            out[int(world_id)].append(
                PlacementRecord(
                    placement,
                    Tier(tier) if tier in _TIER_VALUES else None,
                    activity if isinstance(activity, str) else None,
                    None if why is None else str(why),
                )
            )
        return out

    @staticmethod
    async def write_tier_changes(
        conn: AsyncConnection, changes: Mapping[int, Mapping[int, tuple[Tier, float | None]]]
    ) -> None:
        """Write new tiers: ``{world_id: {npc_id: (tier, due_by)}}``, only for NPCs whose tier changed.

        ``due_by`` (or ``None``) pulls ``next_decision_at`` forward to at most
        that world time (a promoted NPC is decided at its new tier's cadence
        soon), never pushes it back. One executemany, ``world_id`` in every WHERE.
        """
        rows = [
            {"b_id": npc_id, "w": world_id, "b_tier": int(tier), "b_due": due}
            for world_id, per_npc in changes.items()
            for npc_id, (tier, due) in per_npc.items()
        ]
        if not rows:
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
            rows,
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
        limited, so the database never reads NPCs that are not due. Rows that
        cannot be decided are left out (see :meth:`select_due_npcs_many`).
        """
        return (await Store.select_due_npcs_many(conn, [(world_id, world_time, limit)])).npcs[world_id]

    @staticmethod
    async def select_due_npcs_many(conn: AsyncConnection, requests: Sequence[tuple[int, float, int]]) -> DueNpcs:
        """Due NPCs of several worlds in one statement: ``(world_id, world_time, limit)`` each.

        Per world the same rule as :meth:`select_due_npcs`. PostgreSQL: a
        ``LATERAL`` join over ``unnest`` of the requests (one constant
        statement, however many worlds). SQLite: a ``UNION ALL`` of the
        per-world statements, in chunks under its compound-select limit.
        Each row is checked on its own: one that cannot be decided (see
        :func:`_npc_from_row`) goes to ``quarantined`` instead of failing the group.
        """
        out = DueNpcs({world_id: [] for world_id, _, _ in requests}, {})
        wanted = [(w, t, lim) for w, t, lim in requests if lim > 0]
        if not wanted:
            return out
        dialect = conn.dialect.name
        if dialect == "postgresql":
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
            npc = _npc_from_row(row, dialect)
            if isinstance(npc, NpcState):
                out.npcs[row[1]].append(npc)
            else:
                out.quarantined.setdefault(npc.world_id, []).append(npc)
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
                    fence=a.fence,
                )
            return
        params = {
            "wids": [a.world_id for a in advances],
            "expected": [a.expected_ticks for a in advances],
            "ts": [float(a.world_time) for a in advances],
            "ats": [a.advanced_at for a in advances],
            "owners": [a.fence.owner if a.fence is not None else None for a in advances],
            "epochs": [a.fence.epoch if a.fence is not None else None for a in advances],
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
        fence: Fence | None = None,
    ) -> None:
        """Move the committed clock, fenced on the tick counter we planned from.

        ``advanced_at`` is the wall time the new world time corresponds to (the
        tick's start), for humans and external checks; default: now.
        With a ``fence`` (several daemons on PostgreSQL) the update is also
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
        if fence is not None:
            statement = _ADVANCE_WORLD_STATE_LEASED
            params.update(owner=fence.owner, epoch=fence.epoch)
        result = await conn.execute(statement, params)
        if result.rowcount != 1:
            raise StaleWorldStateError(
                f"world {world_id}: state row is not at tick {expected_ticks}"
                + (f" with lease (owner {fence.owner!r}, epoch {fence.epoch})" if fence is not None else "")
                + "; refusing to apply the tick"
            )
