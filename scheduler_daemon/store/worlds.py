"""Worlds and their state rows: creating, loading and checking them, config writes, discovery, snapshots."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.store.base import (
    IDS_PER_STATEMENT,
    MAX_WORLD_META_BYTES,
    StoreBase,
    dialect_insert,
    is_number,
    json_type_name,
    shown,
    wall_now,
)
from scheduler_daemon.store.errors import InvalidStoredWorldError, WorldNotFoundError
from scheduler_daemon.store.leases import Lease, lease_columns
from scheduler_daemon.store.models import metadata, sessions, world_states, worlds


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


class WorldStatus(NamedTuple):
    """What discovery needs to know of one world: its config version, and whether it should tick."""

    config_version: int
    should_run: bool


def _version(value: Any) -> int:
    # A version that is not an integer (SQLite) still discovers the world; loading it reports the field.
    return value if isinstance(value, int) else -1


class Worlds(StoreBase):
    """The ``worlds`` and ``world_states`` tables (the tick's clock move is in :mod:`~scheduler_daemon.store.ticks`)."""

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
            problems.append(f"config_version: expected an integer, got {shown(version)}")
            version = 0
        if world_time is not None and not is_number(world_time):
            problems.append(f"world_states.world_time: expected a finite number, got {shown(world_time)}")
            world_time = None
        if ticks is not None and (not isinstance(ticks, int) or isinstance(ticks, bool) or ticks < 0):
            problems.append(f"world_states.ticks: expected a non-negative integer, got {shown(ticks)}")
            ticks = None
        if isinstance(advanced, str):
            try:
                advanced = datetime.fromisoformat(advanced)
            except ValueError:
                problems.append(f"world_states.last_advanced_at: not a timestamp: {shown(advanced)}")
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
        async with self.reading(conn) as c:
            row = (await c.execute(query)).first()
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
            for start in range(0, len(ids), IDS_PER_STATEMENT):
                chunk = query.where(worlds.c.id.in_(ids[start : start + IDS_PER_STATEMENT]))
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
        insert = dialect_insert(conn, world_states)
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
    async def committed_world_time(conn: AsyncConnection, world_id: int) -> float | None:
        """The world's last committed world time (``None`` if it has no state row)."""
        value = (
            await conn.execute(sa.select(world_states.c.world_time).where(world_states.c.world_id == world_id))
        ).scalar_one_or_none()
        return None if value is None else float(value)

    @staticmethod
    async def restore_world_state(
        conn: AsyncConnection,
        world_id: int,
        *,
        world_time: float,
        ticks: int,
        advanced_at: datetime | None,
        lease: Lease | None = None,
    ) -> bool:
        """Recreate a deleted state row at the given clock; False if a row exists (nothing written).

        ``lease``, the lease the caller holds, is put on the new row (expiry
        from the database clock). A deleted world is not brought back:
        :class:`WorldNotFoundError` (its row is locked against a delete until
        the commit on PostgreSQL).
        """
        exists = sa.select(worlds.c.id).where(worlds.c.id == world_id)
        if conn.dialect.name == "postgresql":
            exists = exists.with_for_update(key_share=True)
        if (await conn.execute(exists)).first() is None:
            raise WorldNotFoundError(world_id)
        values: dict[str, Any] = {
            "world_id": world_id,
            "world_time": world_time,
            "ticks": ticks,
            "last_advanced_at": advanced_at,
            **(lease_columns(lease) if lease is not None else {}),
        }
        insert = dialect_insert(conn, world_states)
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
        query = sa.select(worlds.c.id, worlds.c.config_version).where(self._should_run())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {int(r[0]): _version(r[1]) for r in rows}

    async def world_statuses(self, world_ids: Collection[int]) -> dict[int, WorldStatus]:
        """Of the given worlds, those that exist: config version and whether discovery would run them.

        The same rule as :meth:`discover_active_worlds`, for a few worlds
        (what changed) instead of all of them; a world missing from the
        answer does not exist (deleted).
        """
        ids = sorted(world_ids)
        out: dict[int, WorldStatus] = {}
        query = sa.select(worlds.c.id, worlds.c.config_version, self._should_run())
        async with self.engine.connect() as conn:
            for start in range(0, len(ids), IDS_PER_STATEMENT):
                chunk = query.where(worlds.c.id.in_(ids[start : start + IDS_PER_STATEMENT]))
                out.update({int(r[0]): WorldStatus(_version(r[1]), bool(r[2])) for r in await conn.execute(chunk)})
        return out

    def _should_run(self) -> sa.ColumnElement[bool]:
        """Discovery's rule as an SQL condition on ``worlds``: active, or a row that cannot be judged."""
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
        return sa.or_(has_session, sa.func.coalesce(always_on, sa.false()), sa.func.coalesce(suspect, sa.false()))

    async def active_world_ids(self) -> list[int]:
        """The worlds the daemon's discovery would run, by id: the embedding API's ``get_active_worlds``.

        Worlds with an active session or ``alwaysOn: true``, and worlds whose
        stored row cannot be judged (registering one raises an error naming
        the field), as :meth:`discover_active_worlds` lists them.
        """
        return sorted(await self.discover_active_worlds())

    async def change_world_simulation(
        self,
        world_id: int,
        change: Callable[[WorldRecord], Mapping[str, Any] | None],
    ) -> WorldRecord:
        """Read-modify-write ``meta["simulation"]`` under the world's row lock; returns the record as stored.

        ``change`` gets the current record and returns the new simulation config,
        or ``None`` to leave it as it is (no version bump). It runs inside the
        transaction, which holds the row (``FOR UPDATE``; SQLite: the write
        lock), so concurrent writers of one world are serialized and each
        merges into the latest version: nothing is lost and nothing conflicts
        (a caller's If-Match is checked by ``change``). A stored row that
        cannot be used raises :class:`InvalidStoredWorldError`, an
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
            new_simulation = change(current)
            if new_simulation is None:
                return current
            meta = copy.deepcopy(current.meta)
            meta["simulation"] = copy.deepcopy(dict(new_simulation))
            version = (
                await conn.execute(
                    sa.update(worlds)
                    .where(worlds.c.id == world_id)
                    .values(meta=meta, config_version=worlds.c.config_version + 1, updated_at=wall_now())
                    .returning(worlds.c.config_version)
                )
            ).scalar_one()
        return dataclasses.replace(current, meta=meta, config_version=int(version))

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
