"""NPC rows: adding them, the checks that quarantine unreadable ones, and what tier assignment reads and writes.

Also the column list and row check the tick's due-NPC selection shares (:mod:`scheduler_daemon.store.ticks`).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation.npc import NpcState, Tier
from scheduler_daemon.simulation.tiers import NpcPlacement
from scheduler_daemon.store import state_json
from scheduler_daemon.store.base import MAX_NPC_STATE_BYTES, StoreBase, is_number, json_type_name, shown
from scheduler_daemon.store.models import npcs


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


_NUMBER_FIELDS = ((4, "next_decision_at"), (10, "energy"), (11, "mood_valence"), (12, "mood_arousal"))
_OPTIONAL_NUMBER_FIELDS = ((9, "activity_started_at"), (13, "last_decision_at"))
_OPTIONAL_TEXT_FIELDS = ((5, "location"), (6, "home"), (7, "routine"), (8, "current_activity"))


def _npc_problem(row: Sequence[Any]) -> str | None:
    """What makes a loaded NPC row undecidable (SQLite keeps any value in any column), or ``None``."""
    for i, name in _NUMBER_FIELDS:
        if not is_number(row[i]):
            return f"{name}: expected a finite number, got {shown(row[i])}"
    for i, name in _OPTIONAL_NUMBER_FIELDS:
        if row[i] is not None and not is_number(row[i]):
            return f"{name}: expected a finite number or null, got {shown(row[i])}"
    for i, name in _OPTIONAL_TEXT_FIELDS:
        if row[i] is not None and not isinstance(row[i], str):
            return f"{name}: expected text or null, got {shown(row[i])}"
    if not isinstance(row[14], int) or isinstance(row[14], bool):
        return f"decisions: expected an integer, got {shown(row[14])}"
    return None


def npc_from_row(row: Sequence[Any], dialect: str) -> NpcState | QuarantinedNpc:
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
            state = state_json.loads(state)
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


_TIERS: Final = tuple(Tier)

#: The columns the PostgreSQL selection sends as one array each (see
#: :func:`pg_npcs_from_columns`): every selected column but ``state``.
PG_SELECTED_ARRAYS: Final = tuple(c.name for c in _NPC_COLUMNS if c.name != "state")


def pg_npcs_from_columns(
    columns: Sequence[Sequence[Any]], states: Sequence[Any]
) -> tuple[list[NpcState], list[QuarantinedNpc]]:
    """Selected NPCs from PostgreSQL's column arrays (:data:`PG_SELECTED_ARRAYS`) and their decoded states.

    The columns are typed there: only a non-finite number or a ``state`` that
    is no object (or over the limit: ``None``) can be wrong. One sum per
    column tells whether every number is finite (NaN and infinities poison
    it); only when one is not, or a state is no object, is each row checked
    with :func:`npc_from_row`. Returns the NPCs to decide and the quarantined ones, in order.
    """
    (ids, world_ids, names, tiers, nexts, locations, homes, routines, activities,
     started, energies, valences, arousals, decided, decisions) = columns  # fmt: skip
    # filter(None, …) drops NULLs (and zeros, which cannot make a sum non-finite).
    total = sum(nexts) + sum(energies) + sum(valences) + sum(arousals) + sum(filter(None, started))
    total += sum(filter(None, decided))
    if total - total == 0.0 and set(map(type, states)) == {dict}:
        due = list(
            map(
                NpcState, ids, world_ids, names, map(_TIERS.__getitem__, tiers), nexts, locations, homes, routines,
                activities, started, energies, valences, arousals, decided, decisions, states,
            )
        )  # fmt: skip
        return due, []
    good: list[NpcState] = []
    bad: list[QuarantinedNpc] = []
    for row in zip(*columns, states, strict=True):
        npc = npc_from_row(row, "postgresql")
        if isinstance(npc, NpcState):
            good.append(npc)
        else:
            bad.append(npc)
    return good, bad


#: SQL: the bytes of a row's ``state`` as JSON text in UTF-8, which :data:`MAX_NPC_STATE_BYTES` bounds.
_STATE_BYTES: Final = {"postgresql": "octet_length(state::text)", "sqlite": "length(CAST(state AS BLOB))"}


def npc_problem_sql(dialect: str) -> str:
    """SQL text: why an NPC row cannot be decided (NULL when it can), for scans that must not load ``state``.

    The same rules as :func:`npc_from_row`, checked without shipping the rows.
    """
    if dialect == "postgresql":  # typed columns: only the JSON can be wrong
        return (
            "CASE WHEN jsonb_typeof(state) <> 'object' "
            "THEN 'state: expected a JSON object, got ' || jsonb_typeof(state) "
            f"WHEN {_STATE_BYTES[dialect]} > {MAX_NPC_STATE_BYTES} "
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
        f"WHEN {_STATE_BYTES[dialect]} > {MAX_NPC_STATE_BYTES} "
        f"THEN 'state: larger than the limit of {MAX_NPC_STATE_BYTES} bytes'",
        "WHEN NOT json_valid(state) THEN 'state: stored value is not valid JSON'",
        "WHEN json_type(state) <> 'object' THEN 'state: expected a JSON object, got ' || json_type(state)",
    ]
    return "CASE " + " ".join(checks) + " END"


def selected_npc_columns(dialect: str) -> str:
    """The NPC columns the tick reads; ``state`` NULL when over the limit, so it never leaves the database.

    PostgreSQL: an uncompressed value's stored size is read without touching
    it; only a compressed one (large by definition) is measured as text.
    """
    if dialect == "postgresql":
        small = f"pg_column_compression(state) IS NULL AND pg_column_size(state) <= {MAX_NPC_STATE_BYTES}"
        fits = f"{small} OR {_STATE_BYTES[dialect]} <= {MAX_NPC_STATE_BYTES}"
    else:
        fits = f"{_STATE_BYTES[dialect]} <= {MAX_NPC_STATE_BYTES}"
    guarded = f"CASE WHEN {fits} THEN state END AS state"
    return ", ".join(guarded if c.name == "state" else c.name for c in _NPC_COLUMNS)


class Npcs(StoreBase):
    """The ``npcs`` table outside the tick's hot path (see :class:`~scheduler_daemon.store.ticks.Ticks`)."""

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
            sa.select(sa.text(selected_npc_columns(self.dialect))).select_from(npcs).where(npcs.c.world_id == world_id)
        )
        if ids is not None:
            query = query.where(npcs.c.id.in_(list(ids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(npcs.c.id))).all()
        return [npc for npc in (npc_from_row(r, self.dialect) for r in rows) if isinstance(npc, NpcState)]

    async def npc_problems(self, world_id: int) -> dict[int, str]:
        """The world's NPC rows that cannot be decided, with the reason (the quarantine, read from the database)."""
        problem = sa.text(npc_problem_sql(self.dialect))
        query = sa.select(npcs.c.id, problem).select_from(npcs).where(npcs.c.world_id == world_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(npcs.c.id))).all()
        return {int(r[0]): str(r[1]) for r in rows if r[1] is not None}

    async def tier_counts(self, world_id: int, conn: AsyncConnection | None = None) -> dict[Tier, int]:
        """NPCs of one world per stored tier (a value that is no tier is not counted)."""
        query = sa.select(npcs.c.tier, sa.func.count()).where(npcs.c.world_id == world_id).group_by(npcs.c.tier)
        async with self.reading(conn) as c:
            rows = (await c.execute(query)).all()
        return {Tier(r[0]): int(r[1]) for r in rows if r[0] in _TIER_VALUES}

    @staticmethod
    async def npc_placements_many(
        conn: AsyncConnection, world_ids: Collection[int]
    ) -> dict[int, list[PlacementRecord]]:
        """Every NPC of the given worlds with what tiering needs, and why it cannot be decided (if so).

        A few narrow columns and a row check in SQL (:func:`npc_problem_sql`):
        ``state`` itself never leaves the database here.
        """
        out: dict[int, list[PlacementRecord]] = {w: [] for w in world_ids}
        problem = sa.text(npc_problem_sql(conn.dialect.name))
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
