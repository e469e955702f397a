"""The tick's hot path: the grouped reads and writes of every tick, each on the tick's open connection.

Due-NPC selection, the due-work probe, the backlog probe, the decided NPC
columns written back, and the fenced clock move. Statements are built once
at import (per group size on SQLite).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.store import decided_rows, state_json
from scheduler_daemon.store.base import SQLITE_WORLDS_PER_SELECT, StoreBase, driver_execute, wall_now
from scheduler_daemon.store.errors import StaleWorldStateError
from scheduler_daemon.store.fence import Fence
from scheduler_daemon.store.models import npcs, world_states
from scheduler_daemon.store.npcs import (
    PG_SELECTED_ARRAYS,
    QuarantinedNpc,
    npc_from_row,
    pg_npcs_from_columns,
    selected_npc_columns,
)
from scheduler_daemon.store.pg_arrays import float8_array, int4_array, int8_array, text_array


@dataclass(frozen=True, slots=True)
class DueNpcs:
    """The due NPCs of several worlds, by world: the ones to decide, and the rows quarantined on the way."""

    npcs: dict[int, list[NpcState]]
    quarantined: dict[int, list[QuarantinedNpc]]


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


def _due_one_sql(w: str, t: str, lim: str) -> str:
    """One world's due NPCs: a UNION ALL of one index range per tier, each in due order and limited."""
    per_tier = " UNION ALL ".join(
        f"SELECT * FROM (SELECT {selected_npc_columns('sqlite')} FROM npcs WHERE world_id = {w} "
        f"AND tier = {int(tier)} "
        f"AND next_decision_at <= {t} ORDER BY next_decision_at, id LIMIT {lim})"
        for tier in SIMULATED_TIERS
    )
    return f"SELECT * FROM ({per_tier}) ORDER BY tier, next_decision_at, id LIMIT {lim}"


@functools.cache
def _due_many_sqlite(worlds: int) -> sa.TextClause:
    # Prebuilt text per group size: building the equivalent Core constructs
    # for every tick costs more than running the query on SQLite.
    return sa.text(
        " UNION ALL ".join(f"SELECT * FROM ({_due_one_sql(f':w{i}', f':t{i}', f':l{i}')})" for i in range(worlds))
    )


def _due_many_pg() -> str:
    per_tier = " UNION ALL ".join(
        f"(SELECT {selected_npc_columns('postgresql')} FROM npcs WHERE world_id = q.world_id AND tier = {int(t)} "
        f"AND next_decision_at <= q.now ORDER BY next_decision_at, id LIMIT q.lim)"
        for t in SIMULATED_TIERS
    )
    # One row for the whole group: each column one array, the states one JSON
    # array, world by world in request order and each world's in due order
    # (aggregated from the sorted subquery). One message the server sends at
    # once and one JSON parse cost the client far less than a row, a wakeup
    # per network chunk and a jsonb value per NPC (docs/performance.md).
    columns = ", ".join(f"array_agg(n.{c})" for c in PG_SELECTED_ARRAYS)
    # psycopg placeholders: run on the driver's connection (see select_due_npcs_many).
    return (
        f"SELECT {columns}, json_agg(n.state)::text FROM ("
        f"SELECT n.* FROM unnest(%b, %b, %b) WITH ORDINALITY AS q(world_id, now, lim, ord) CROSS JOIN LATERAL ("
        f"SELECT * FROM ({per_tier}) AS u ORDER BY tier, next_decision_at, id LIMIT q.lim) AS n "
        f"ORDER BY q.ord, n.tier, n.next_decision_at, n.id) AS n"
    )


_DUE_MANY_PG = _due_many_pg()

#: At most this many due NPCs (the sum of the worlds' limits) per selection
#: statement: its states are one text value, which PostgreSQL caps at 1 GB
#: (2,048 states within MAX_NPC_STATE_BYTES are 512 MiB as stored; their text
#: is about as long unless it is mostly escaped characters).
PG_NPCS_PER_SELECT: Final = 2048
#: A grouped write whose states' JSON array is longer is split in halves:
#: PostgreSQL caps a jsonb array at 256 MiB (its binary form may be a few
#: times the text for tiny numbers).
PG_STATES_DOCUMENT_BYTES: Final = 16 * 1024 * 1024


def _pg_selection_chunks(wanted: Sequence[tuple[int, float, int]]) -> list[Sequence[tuple[int, float, int]]]:
    """The requests in order, cut where the sum of their limits would pass :data:`PG_NPCS_PER_SELECT`."""
    chunks: list[Sequence[tuple[int, float, int]]] = []
    start = npcs = 0
    for index, (_, _, limit) in enumerate(wanted):
        if npcs + limit > PG_NPCS_PER_SELECT and index > start:
            chunks.append(wanted[start:index])
            start, npcs = index, 0
        npcs += limit
    chunks.append(wanted[start:])
    return chunks


_WORLD_OF: Final = operator.attrgetter("world_id")

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


def _waiting_many_pg() -> str:
    per_tier = " UNION ALL ".join(
        f"(SELECT {int(t)} AS tier, next_decision_at FROM npcs WHERE world_id = q.world_id AND tier = {int(t)} "
        f"AND next_decision_at <= q.now AND (next_decision_at, id) > (q.after_at{int(t)}, q.after_id{int(t)}) "
        f"ORDER BY next_decision_at, id LIMIT 1)"
        for t in SIMULATED_TIERS
    )
    afters = ", ".join("%b, %b" for _ in SIMULATED_TIERS)
    columns = ", ".join(f"after_at{int(t)}, after_id{int(t)}" for t in SIMULATED_TIERS)
    # psycopg placeholders: run on the driver's connection, like the due-NPC selection.
    return (
        f"SELECT q.world_id, w.tier, w.next_decision_at FROM unnest(%b, %b, {afters}) "
        f"AS q(world_id, now, {columns}) CROSS JOIN LATERAL ({per_tier}) AS w"
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
_DUE_WORK_PG: Final = _DUE_WORK_BODY + "FROM unnest(%b, %b) AS q(world_id, now)"


@functools.cache
def _due_work_sqlite(worlds: int) -> sa.TextClause:
    values = ", ".join(f"(:w{i}, :t{i})" for i in range(worlds))
    return sa.text(f"WITH q(world_id, now) AS (VALUES {values}) " + _DUE_WORK_BODY + "FROM q")


# Several worlds' clock moves in one statement (PostgreSQL), each fenced like
# _ADVANCE_WORLD_STATE(_LEASED); RETURNING says which rows moved. Run on the
# driver's connection with packed columns, like the NPC write: through
# SQLAlchemy with list parameters it cost more (docs/performance.md).
_ADVANCE_MANY_PG: Final = (
    "UPDATE world_states AS ws SET world_time = d.t, ticks = ws.ticks + 1, last_advanced_at = d.at "
    "FROM unnest(%b, %b, %b, CAST(%b AS timestamptz[]), %b, %b) "
    "AS d(w, expected, t, at, owner, epoch) "
    "WHERE ws.world_id = d.w AND ws.ticks = d.expected "
    "AND (d.owner IS NULL OR (ws.lease_owner = d.owner AND ws.lease_epoch = d.epoch)) "
    "RETURNING ws.world_id"
)

# Set-based NPC write on PostgreSQL: one UPDATE … FROM unnest(…) for a whole
# group of worlds, each column one packed binary array (store/pg_arrays.py),
# run on the driver's connection. The states to write come as one JSON array
# (the first parameter), each row with its element's index; NULL keeps the stored JSON.
_WRITE_DECISIONS_MANY_PG: Final = (
    "UPDATE npcs SET next_decision_at = d.next, current_activity = d.activity, activity_started_at = d.started, "
    "location = d.location, energy = d.energy, mood_valence = d.valence, mood_arousal = d.arousal, "
    "last_decision_at = d.decided, decisions = npcs.decisions + 1, state = COALESCE(%b -> d.state, npcs.state) "
    "FROM unnest(%b, %b, %b, %b, %b, %b, %b, %b, %b, %b, %b) "
    "AS d(w, id, next, activity, started, location, energy, valence, arousal, decided, state) "
    "WHERE npcs.id = d.id AND npcs.world_id = d.w"
)


class Ticks(StoreBase):
    """Every statement of a grouped tick's transaction except the claims, chains and the fence."""

    @staticmethod
    @asynccontextmanager
    async def group_savepoint(conn: AsyncConnection) -> AsyncIterator[None]:
        """A savepoint around a grouped tick's bodies and writes: rolled back to when they raise an ``Exception``.

        The exception propagates (a cancellation, or a connection dropped on
        the way, leaves the savepoint to the enclosing transaction's rollback). PostgreSQL: set on the driver's
        connection and released by the ``COMMIT``: one round trip, where
        SQLAlchemy's nested transaction costs two and its bookkeeping
        (docs/performance.md). SQLite: SQLAlchemy's nested transaction.
        """
        if conn.dialect.name != "postgresql":
            async with conn.begin_nested():
                yield
            return
        await driver_execute(conn, "SAVEPOINT tick_group", ())
        try:
            yield
        except Exception:
            # A connection dropped on the way (lost, or unable to write) has no
            # savepoint to go back to: its error goes on as it is (a transient
            # one fails the whole unit, which is retried).
            if not conn.invalidated:
                await driver_execute(conn, "ROLLBACK TO SAVEPOINT tick_group", ())
            raise

    @staticmethod
    async def select_due_npcs(conn: AsyncConnection, world_id: int, world_time: float, limit: int) -> list[NpcState]:
        """At most ``limit`` due NPCs of one world: higher tiers first, most overdue first.

        One statement: a UNION ALL of one index range per tier on
        ``(world_id, tier, next_decision_at)``, each already in due order and
        limited, so the database never reads NPCs that are not due. Rows that
        cannot be decided are left out (see :meth:`select_due_npcs_many`).
        """
        return (await Ticks.select_due_npcs_many(conn, [(world_id, world_time, limit)])).npcs[world_id]

    @staticmethod
    async def select_due_npcs_many(conn: AsyncConnection, requests: Sequence[tuple[int, float, int]]) -> DueNpcs:
        """Due NPCs of several worlds in one statement: ``(world_id, world_time, limit)`` each.

        Per world the same rule as :meth:`select_due_npcs`. PostgreSQL: a
        ``LATERAL`` join over ``unnest`` of the requests (one constant
        statement, however many worlds). SQLite: a ``UNION ALL`` of the
        per-world statements, in chunks under its compound-select limit.
        Each row is checked on its own: one that cannot be decided (see
        :func:`~scheduler_daemon.store.npcs.npc_from_row`) goes to ``quarantined`` instead of failing the group.
        """
        out = DueNpcs({world_id: [] for world_id, _, _ in requests}, {})
        wanted = [(w, t, lim) for w, t, lim in requests if lim > 0]
        if not wanted:
            return out
        dialect = conn.dialect.name
        if dialect == "postgresql":
            # The driver's cursor: SQLAlchemy's rows and type processing cost
            # more per NPC than the statement (docs/performance.md). Binary rows:
            # numbers need no parsing; the states are one JSON text, decoded at once.
            for chunk in _pg_selection_chunks(wanted):
                cursor = await driver_execute(
                    conn,
                    _DUE_MANY_PG,
                    (
                        int4_array([w for w, _, _ in chunk]),
                        float8_array([float(t) for _, t, _ in chunk]),
                        int4_array([lim for _, _, lim in chunk]),
                    ),
                    binary=True,
                )
                *columns, states = await cursor.fetchone()
                if states is None:  # no NPC due in any of the worlds
                    continue
                due, bad = pg_npcs_from_columns(columns, state_json.loads(states))
                for world_id, npcs_of_world in itertools.groupby(due, _WORLD_OF):
                    out.npcs[world_id].extend(npcs_of_world)
                for q in bad:
                    out.quarantined.setdefault(q.world_id, []).append(q)
            return out
        rows: list[Any] = []
        for start in range(0, len(wanted), SQLITE_WORLDS_PER_SELECT):
            chunk = wanted[start : start + SQLITE_WORLDS_PER_SELECT]
            params: dict[str, Any] = {}
            for i, (w, t, lim) in enumerate(chunk):
                params[f"w{i}"], params[f"t{i}"], params[f"l{i}"] = w, float(t), lim
            rows.extend((await conn.execute(_due_many_sqlite(len(chunk)), params)).all())
        for row in rows:
            npc = npc_from_row(row, dialect)
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
            cursor = await driver_execute(
                conn,
                _DUE_WORK_PG,
                (int4_array([w for w, _ in requests]), float8_array([float(t) for _, t in requests])),
            )
            rows: list[Any] = await cursor.fetchall()
        else:
            rows = []
            for start in range(0, len(requests), SQLITE_WORLDS_PER_SELECT):
                chunk = requests[start : start + SQLITE_WORLDS_PER_SELECT]
                params: dict[str, Any] = {}
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
                out[world_id] = await Ticks.oldest_waiting(conn, world_id, world_time, taken)
            return out
        params: list[Any] = [int4_array([w for w, _, _ in requests]), float8_array([float(t) for _, t, _ in requests])]
        for t in SIMULATED_TIERS:
            afters = [taken.get(t, _BEFORE_ALL) for _, _, taken in requests]
            params.append(float8_array([float(at) for at, _ in afters], finite=False))  # -inf: before all
            params.append(int4_array([npc_id for _, npc_id in afters]))
        cursor = await driver_execute(conn, _WAITING_MANY_PG, params)
        for world_id, tier, next_at in await cursor.fetchall():
            out[int(world_id)][Tier(tier)] = float(next_at)
        return out

    @staticmethod
    async def write_decisions(
        conn: AsyncConnection,
        world_id: int,
        decisions: Sequence[NpcDecision],
        read: Sequence[NpcState] | None = None,
    ) -> None:
        """Write one world's decided NPC columns back (see :meth:`write_decisions_many`)."""
        await Ticks.write_decisions_many(conn, [(world_id, decisions)], None if read is None else [read])

    @staticmethod
    async def write_decisions_many(
        conn: AsyncConnection,
        batches: Sequence[tuple[int, Sequence[NpcDecision]]],
        read: Sequence[Sequence[NpcState]] | None = None,
    ) -> None:
        """Write decided NPC columns back for several worlds (``world_id`` in every WHERE).

        ``read``, per batch, the NPCs the decisions were made from, in the same
        order: a decided ``state`` equal to the one read (as JSON: ``1`` is not ``true``) is left as stored (not
        encoded, sent and parsed again, and a game's write since the read is not
        undone), unless it is the very dict read, which may have been changed in
        place. PostgreSQL: one set-based ``UPDATE … FROM unnest(…)`` of packed
        columns for all of them, the states to write as one JSON array. SQLite
        (in process, no round trips to save): one executemany.
        """
        world_ids: list[int] = []
        decided: list[NpcDecision] = []
        states: list[Any] = []  # per decision: the state to write, or None to keep the stored one
        for index, (world_id, decisions) in enumerate(batches):
            world_ids.extend(itertools.repeat(world_id, len(decisions)))
            decided.extend(decisions)
            if read is None:
                states.extend(d.state for d in decisions)
            else:
                states.extend(map(decided_rows.state_to_write, decisions, read[index]))
        if not decided:
            return
        if conn.dialect.name == "postgresql":
            await Ticks._write_decisions_pg(conn, world_ids, decided, states)
            return
        # SQLite would store most of a plug-in's bad values as they are: the same rules as PostgreSQL's.
        decided_rows.check_decisions(decided)
        # As floats, as PostgreSQL's float8 takes them (SQLite binds an int past 64 bits as no REAL).
        rows = [
            (
                float(d.next_decision_at),
                d.current_activity,
                None if d.activity_started_at is None else float(d.activity_started_at),
                d.location,
                float(d.energy),
                float(d.mood_valence),
                float(d.mood_arousal),
                float(d.decided_at),
                None if state is None else decided_rows.encode_state(d, state).decode(),
                d.npc_id,
                world_id,
            )
            for world_id, d, state in zip(world_ids, decided, states, strict=True)
        ]
        await conn.exec_driver_sql(_WRITE_DECISION_SQLITE, rows)

    @staticmethod
    async def _write_decisions_pg(
        conn: AsyncConnection, world_ids: Sequence[int], decided: Sequence[NpcDecision], states: Sequence[Any]
    ) -> None:
        columns = decided_rows.pg_columns(world_ids, decided, states)
        if len(columns[0].data) > PG_STATES_DOCUMENT_BYTES and sum(s is not None for s in states) > 1:
            # PostgreSQL caps a jsonb array at 256 MiB: written in halves, each its own statement.
            half = len(decided) // 2
            await Ticks._write_decisions_pg(conn, world_ids[:half], decided[:half], states[:half])
            await Ticks._write_decisions_pg(conn, world_ids[half:], decided[half:], states[half:])
            return
        await driver_execute(conn, _WRITE_DECISIONS_MANY_PG, columns)

    @staticmethod
    async def advance_world_states(conn: AsyncConnection, advances: Sequence[WorldAdvance]) -> None:
        """:meth:`advance_world_state` for several worlds: one statement on PostgreSQL.

        Raises :class:`StaleWorldStateError` naming every world whose row did
        not move (the caller rolls the group back and isolates them).
        """
        if len(advances) == 1 or conn.dialect.name != "postgresql":
            for a in advances:
                await Ticks.advance_world_state(
                    conn,
                    a.world_id,
                    world_time=a.world_time,
                    expected_ticks=a.expected_ticks,
                    advanced_at=a.advanced_at,
                    fence=a.fence,
                )
            return
        params = (
            int4_array([a.world_id for a in advances]),
            int8_array([a.expected_ticks for a in advances]),
            float8_array([float(a.world_time) for a in advances]),
            [a.advanced_at for a in advances],
            text_array([a.fence.owner if a.fence is not None else None for a in advances]),
            int8_array([a.fence.epoch if a.fence is not None else None for a in advances]),
        )
        cursor = await driver_execute(conn, _ADVANCE_MANY_PG, params)
        moved = {int(r[0]) for r in await cursor.fetchall()}
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
            "at": advanced_at or wall_now(),
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
