"""NPCs as a game writes and reads them: bulk upsert by id or external id, and paged reads of every field.

Upserts and reads work in column dicts (``npcs`` column names); the wire
format is :mod:`scheduler_daemon.entities`'. See :mod:`~scheduler_daemon.store.ingest`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.base import IDS_PER_STATEMENT, StoreBase, is_number
from scheduler_daemon.store.errors import EntityRowsError, NpcNotFoundError
from scheduler_daemon.store.models import npcs
from scheduler_daemon.store.notifications import CHANNEL
from scheduler_daemon.store.npcs import npc_problem_sql, selected_npc_columns

#: Columns a bulk upsert may write (``id`` only selects the row).
UPSERT_COLUMNS: Final = frozenset(
    {
        "external_id",
        "name",
        "location",
        "home",
        "routine",
        "energy",
        "mood_valence",
        "mood_arousal",
        "state",
        "tier",
        "current_activity",
        "activity_started_at",
        "next_decision_at",
        "last_decision_at",
        "decisions",
    }
)
_TEXT: Final = ("name", "external_id", "location", "home", "routine", "current_activity")
_NUMBERS: Final = (
    "energy",
    "mood_valence",
    "mood_arousal",
    "next_decision_at",
    "activity_started_at",
    "last_decision_at",
)
_TIERS: Final = frozenset(int(t) for t in Tier)


@dataclass(frozen=True, slots=True)
class NpcPage:
    """NPC column dicts in id order (plus ``problem``: why the daemon cannot decide it, or ``None``)."""

    rows: list[dict[str, Any]]
    #: The last id of this page when more follow (pass it as ``after``), else ``None``.
    next_cursor: int | None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _checked_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A read NPC row with every value of the wrong type as ``None`` (SQLite keeps any value in any column).

    ``problem`` (computed in SQL with the tick's own rules) says what is wrong.
    """
    out = {k: row[k] for k in ("id", "world_id", "problem")}
    for key in _TEXT:
        out[key] = row[key] if isinstance(row[key], str) else None
    for key in _NUMBERS:
        out[key] = float(row[key]) if is_number(row[key]) else None
    for key in ("tier", "decisions"):
        value = row[key]
        out[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    if out["tier"] not in _TIERS:
        out["tier"] = None
    state = row["state"]
    if isinstance(state, str):
        try:
            state = json.loads(state, parse_constant=_refuse_constant)
        except ValueError:
            state = None
    out["state"] = state if isinstance(state, dict) else None
    return out


def _merged_state(stored: Any, sent: Mapping[str, Any]) -> dict[str, Any]:
    """The stored state with the sent top-level keys replaced (an unreadable stored state is replaced)."""
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            stored = None
    return {**(stored if isinstance(stored, dict) else {}), **sent}


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs of rows with the same key set (an executemany needs one), order kept."""
    return [list(run) for _, run in itertools.groupby(rows, key=lambda r: tuple(sorted(r)))]


class IngestNpcs(StoreBase):
    """NPCs by reference: resolve, bulk upsert, paged read."""

    @staticmethod
    async def resolve_npc(conn: AsyncConnection, world_id: int, ref: int | str) -> int:
        """The daemon id of an NPC of this world by id or external id; raises :class:`NpcNotFoundError`."""
        key = npcs.c.id == ref if isinstance(ref, int) else npcs.c.external_id == ref
        found = (await conn.execute(sa.select(npcs.c.id).where(npcs.c.world_id == world_id, key))).scalar_one_or_none()
        if found is None:
            raise NpcNotFoundError(world_id, ref)
        return int(found)

    async def upsert_npcs(
        self, conn: AsyncConnection, world_id: int, items: Sequence[Mapping[str, Any]]
    ) -> list[tuple[int, bool]]:
        """Insert or update NPCs (column dicts); returns ``(id, created)`` per item, in order.

        An item with an ``external_id`` updates the NPC that has it, else is
        inserted (with an ``id`` too: that NPC gets the external id). An item
        with only an ``id`` updates that NPC, which must exist; one with
        neither is inserted. Updates write only the columns given, ``state``
        merged at its top level. Every problem (an unknown ``id``, an ``id``
        and ``external_id`` of two NPCs, two items for one NPC or for one
        external id) is raised together as :class:`EntityRowsError` before
        anything is written; the caller's transaction makes the whole batch
        one commit.
        """
        unknown = sorted({k for item in items for k in item} - UPSERT_COLUMNS - {"id"})
        if unknown:
            raise ValueError(f"not npcs columns: {', '.join(unknown)}")
        by_id, by_external, states = await self._existing(conn, world_id, items)
        problems: list[tuple[int, str, str]] = []
        targets: list[int | None] = []
        claimed: dict[int, int] = {}
        named: dict[str, int] = {}  # external id -> first item giving it (an insert and a rename alike)
        for index, item in enumerate(items):
            npc_id, external = item.get("id"), item.get("external_id")
            target = by_external.get(external) if external is not None else None
            if target is not None and npc_id is not None and npc_id != target:
                problems.append((index, "id", f"externalId {external!r} is NPC {target}, not {npc_id}"))
            elif target is None and npc_id is not None:
                if npc_id in by_id:
                    target = npc_id
                else:
                    problems.append((index, "id", f"NPC {npc_id} does not exist in world {world_id}"))
            if target is not None and target in claimed:
                field = "externalId" if external is not None else "id"
                problems.append((index, field, f"NPC {target} is also item {claimed[target]}"))
            elif external is not None and external in named:
                problems.append((index, "externalId", f"externalId {external!r} is also item {named[external]}"))
            elif target is not None:
                claimed[target] = index
            if external is not None:
                named.setdefault(external, index)
            targets.append(target)
        if problems:
            raise EntityRowsError(world_id, problems)
        await self._write_updates(conn, world_id, items, targets, states)
        if conn.dialect.name == "postgresql" and any(t is not None for t in targets):
            # The triggers leave the columns ticks write (location, energy, state…) quiet; a game's
            # update of them must still reach the world's owner, which may be another daemon.
            await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, str(world_id))))
        return await self._write_inserts(conn, world_id, items, targets)

    @staticmethod
    async def _existing(
        conn: AsyncConnection, world_id: int, items: Sequence[Mapping[str, Any]]
    ) -> tuple[set[int], dict[str, int], dict[int, Any]]:
        """The world's NPCs the items name: their ids, ``{external_id: id}``, and stored states (rows locked)."""
        ids = sorted({i["id"] for i in items if i.get("id") is not None})
        externals = sorted({i["external_id"] for i in items if i.get("external_id") is not None})
        # State as stored (text on SQLite), merged in Python: both databases, one rule.
        state = sa.type_coerce(npcs.c.state, sa.Text) if conn.dialect.name == "sqlite" else npcs.c.state
        base = sa.select(npcs.c.id, npcs.c.external_id, state).where(npcs.c.world_id == world_id)
        if conn.dialect.name == "postgresql":
            base = base.with_for_update()
        rows: list[Sequence[Any]] = []
        for column, keys in ((npcs.c.id, ids), (npcs.c.external_id, externals)):
            for start in range(0, len(keys), IDS_PER_STATEMENT):
                query = base.where(column.in_(keys[start : start + IDS_PER_STATEMENT]))
                rows += (await conn.execute(query)).all()
        by_external = {str(r[1]): int(r[0]) for r in rows if r[1] is not None}
        return {int(r[0]) for r in rows}, by_external, {int(r[0]): r[2] for r in rows}

    @staticmethod
    async def _write_updates(
        conn: AsyncConnection,
        world_id: int,
        items: Sequence[Mapping[str, Any]],
        targets: Sequence[int | None],
        states: Mapping[int, Any],
    ) -> None:
        rows = []
        for item, target in zip(items, targets, strict=True):
            if target is None:
                continue
            row = {f"v_{k}": v for k, v in item.items() if k != "id"}
            if "state" in item:
                row["v_state"] = _merged_state(states.get(target), item["state"])
            rows.append({**row, "b_id": target})
        for run in _same_keys(rows):
            columns = [k.removeprefix("v_") for k in run[0] if k.startswith("v_")]
            if not columns:
                continue  # an item naming an NPC and nothing to change
            statement = (
                sa.update(npcs)
                .where(npcs.c.id == sa.bindparam("b_id"), npcs.c.world_id == world_id)
                .values({c: sa.bindparam(f"v_{c}", type_=npcs.c[c].type) for c in columns})
            )
            await conn.execute(statement, run)

    @staticmethod
    async def _write_inserts(
        conn: AsyncConnection, world_id: int, items: Sequence[Mapping[str, Any]], targets: Sequence[int | None]
    ) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = [(t, False) if t is not None else (0, True) for t in targets]
        new = [
            (index, {"state": {}, **{k: v for k, v in item.items() if k != "id"}, "world_id": world_id})
            for index, (item, target) in enumerate(zip(items, targets, strict=True))
            if target is None
        ]
        for run in [list(r) for _, r in itertools.groupby(new, key=lambda p: tuple(sorted(p[1])))]:
            insert = sa.insert(npcs).returning(npcs.c.id, sort_by_parameter_order=True)
            ids = (await conn.execute(insert, [row for _, row in run])).scalars().all()
            for (index, _), npc_id in zip(run, ids, strict=True):
                out[index] = (int(npc_id), True)
        return out

    async def npc_page(
        self,
        world_id: int,
        *,
        tier: Tier | None = None,
        after: int | None = None,
        limit: int = 100,
        conn: AsyncConnection | None = None,
    ) -> NpcPage:
        """Up to ``limit`` NPCs of a world (of one stored ``tier``) with ids above ``after``, every column.

        A row the daemon cannot decide is still listed, with ``problem`` set
        and its unreadable values as ``None``; a ``state`` over the size limit
        is not read (``None``). Index ``(world_id, id)``.
        """
        problem = f"({npc_problem_sql(self.dialect)}) AS problem"
        columns = sa.text(f"{selected_npc_columns(self.dialect)}, external_id, {problem}")
        query = sa.select(columns).select_from(npcs).where(npcs.c.world_id == world_id)
        if tier is not None:
            query = query.where(npcs.c.tier == int(tier))
        if after is not None:
            query = query.where(npcs.c.id > after)
        query = query.order_by(npcs.c.id).limit(limit + 1)
        async with self.reading(conn) as c:
            rows = (await c.execute(query)).mappings().all()
        more = len(rows) > limit
        checked = [_checked_row(r) for r in rows[:limit]]
        return NpcPage(checked, checked[-1]["id"] if more else None)
