"""What a game writes and reads through the ingest API and import files: worlds, NPCs, sessions, by id or external id.

A reference is a daemon id (``int``) or the game's external id (``str``).
Every write takes the caller's open connection, so a request, or one world of
an import (world, NPCs and sessions together), commits as one transaction or
not at all::

    async with store.transaction() as conn:
        world = await store.upsert_world(conn, name="Harbor", meta={}, external_id="harbor")
        await store.upsert_npcs(conn, world.id, [{"external_id": "bob", "name": "Bob"}])
        await store.upsert_session(conn, world.id, {"external_id": "s1", "user_id": "u1", ...})

Two writers inserting the same new external id at once: the second fails on
the unique index (:func:`~scheduler_daemon.store.errors.is_unique_violation`);
run it again and it finds the first one's row.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.store.base import IDS_PER_STATEMENT, wall_now
from scheduler_daemon.store.errors import (
    ExternalIdTakenError,
    SessionNotFoundError,
    UnknownNpcsError,
    WorldNotFoundError,
)
from scheduler_daemon.store.ingest_npcs import IngestNpcs
from scheduler_daemon.store.models import interaction_cooldowns, npcs, sessions, world_states, worlds
from scheduler_daemon.store.worlds import Worlds

__all__ = ["KEEP", "Ingest", "Keep", "StoredWorld", "Upserted"]


class Keep(enum.Enum):
    """Leave a column as it is (``external_id=KEEP``; ``None`` removes it)."""

    KEEP = enum.auto()


KEEP: Final = Keep.KEEP


@dataclass(frozen=True, slots=True)
class Upserted:
    """The id an upserted row has, and whether it was inserted (``False``: an existing row)."""

    id: int
    created: bool


@dataclass(frozen=True, slots=True)
class StoredWorld:
    """A world with its external id and committed clock; ``problem`` says why ``meta`` cannot be used (then ``{}``)."""

    id: int
    external_id: str | None
    name: str
    meta: dict[str, Any]
    config_version: int
    world_time: float | None
    problem: str | None = None


def _decoded_list(raw: Any) -> list[Any]:
    """A session's NPC list as stored (raw JSON text on SQLite); anything unreadable as empty."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []
    return list(raw) if isinstance(raw, list) else []


def session_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``sessions`` row as a column dict with decoded NPC lists."""
    return {
        "id": int(row["id"]),
        "external_id": row["external_id"],
        "user_id": row["user_id"],
        "location": row["location"],
        "scene_npc_ids": _decoded_list(row["scene_npc_ids"]),
        "involved_npc_ids": _decoded_list(row["involved_npc_ids"]),
        "active": bool(row["active"]),
    }


async def _world_with_external_id(conn: AsyncConnection, external_id: str) -> int | None:
    """The id of the world that has ``external_id``, if one has."""
    found = (await conn.execute(sa.select(worlds.c.id).where(worlds.c.external_id == external_id))).scalar_one_or_none()
    return None if found is None else int(found)


def _session_select() -> sa.Select[Any]:
    # Lists as text on SQLite too (decoded by session_columns): a bad stored value must not fail the read.
    return sa.select(
        sessions.c.id,
        sessions.c.external_id,
        sessions.c.user_id,
        sessions.c.location,
        sa.type_coerce(sessions.c.scene_npc_ids, sa.Text).label("scene_npc_ids"),
        sa.type_coerce(sessions.c.involved_npc_ids, sa.Text).label("involved_npc_ids"),
        sessions.c.active,
    )


class Ingest(IngestNpcs, Worlds):
    """Worlds and sessions by reference (NPCs: :class:`~scheduler_daemon.store.ingest_npcs.IngestNpcs`)."""

    # ------------------------------------------------------------ worlds
    def _stored_world_query(self) -> sa.Select[Any]:
        return self._world_query().add_columns(worlds.c.external_id)

    def _stored_world(self, row: Sequence[Any]) -> StoredWorld:
        record = self._world_record(row[:8])
        external = row[8] if isinstance(row[8], str) else None
        return StoredWorld(
            record.id, external, record.name, record.meta, record.config_version, record.world_time, record.problem
        )

    async def world_by_ref(
        self, ref: int | str, conn: AsyncConnection | None = None, *, for_update: bool = False
    ) -> StoredWorld:
        """One world by id or external id; raises :class:`WorldNotFoundError`.

        ``for_update`` (inside the caller's transaction) locks its row until the commit (PostgreSQL).
        """
        key = worlds.c.id == ref if isinstance(ref, int) else worlds.c.external_id == ref
        query = self._stored_world_query().where(key)
        if for_update and self.dialect == "postgresql":
            query = query.with_for_update(of=worlds)
        async with self.reading(conn) as c:
            row = (await c.execute(query)).first()
        if row is None:
            raise WorldNotFoundError(ref)
        return self._stored_world(row)

    async def resolve_world(self, ref: int | str, conn: AsyncConnection | None = None, *, lock: bool = False) -> int:
        """The daemon id of a world reference; raises :class:`WorldNotFoundError`.

        ``lock`` (inside the caller's transaction) keeps the world from being
        deleted until the commit (PostgreSQL ``FOR KEY SHARE``; config writes
        are not blocked), so rows written for it never miss their world.
        """
        key = worlds.c.id == ref if isinstance(ref, int) else worlds.c.external_id == ref
        query = sa.select(worlds.c.id).where(key)
        if lock and self.dialect == "postgresql":
            query = query.with_for_update(key_share=True)
        async with self.reading(conn) as c:
            found = (await c.execute(query)).scalar_one_or_none()
        if found is None:
            raise WorldNotFoundError(ref)
        return int(found)

    @staticmethod
    async def insert_world(
        conn: AsyncConnection,
        *,
        name: str,
        meta: Mapping[str, Any],
        external_id: str | None = None,
        world_time: float = 0.0,
    ) -> Upserted:
        """Insert a world and its state row (clock at ``world_time``).

        With an ``external_id`` another world already has, nothing is written
        and that world's id comes back (``created=False``).
        """
        insert = sa.insert(worlds).values(name=name, meta=dict(meta), external_id=external_id)
        if external_id is not None:
            found = await _world_with_external_id(conn, external_id)
            if found is not None:
                return Upserted(found, False)
        world_id = int((await conn.execute(insert.returning(worlds.c.id))).scalar_one())
        await conn.execute(sa.insert(world_states).values(world_id=world_id, world_time=world_time))
        return Upserted(world_id, True)

    async def update_world(
        self,
        conn: AsyncConnection,
        world_id: int,
        *,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        external_id: str | Literal[Keep.KEEP] | None = KEEP,
    ) -> StoredWorld:
        """Write the given fields of a world (``None``: keep; ``external_id=None`` removes it); returns it as stored.

        Only values that differ are written; a changed ``meta`` bumps
        ``config_version`` (discovery re-reads the world). Locks the row until
        the caller commits. Raises :class:`WorldNotFoundError` and
        :class:`ExternalIdTakenError`.
        """
        current = await self.world_by_ref(world_id, conn, for_update=True)
        values: dict[str, Any] = {}
        if name is not None and name != current.name:
            values["name"] = name
        if meta is not None and (current.problem is not None or dict(meta) != current.meta):
            values["meta"] = dict(meta)
            values["config_version"] = worlds.c.config_version + 1
        if external_id is not KEEP and external_id != current.external_id:
            if external_id is not None:
                owner = await _world_with_external_id(conn, external_id)
                if owner is not None:
                    raise ExternalIdTakenError("world", external_id, owner)
            values["external_id"] = external_id
        if not values:
            return current
        await conn.execute(sa.update(worlds).where(worlds.c.id == world_id).values(**values, updated_at=wall_now()))
        return await self.world_by_ref(world_id, conn)

    async def upsert_world(
        self,
        conn: AsyncConnection,
        *,
        name: str,
        meta: Mapping[str, Any],
        external_id: str | None = None,
        world_time: float = 0.0,
    ) -> Upserted:
        """Insert a world, or (same external id) replace its name and whole ``meta`` (``world_time`` only on insert)."""
        done = await self.insert_world(conn, name=name, meta=meta, external_id=external_id, world_time=world_time)
        if not done.created:
            await self.update_world(conn, done.id, name=name, meta=meta)
        return done

    @staticmethod
    async def delete_world(conn: AsyncConnection, world_id: int) -> bool:
        """Delete a world and everything it owns (cascade: state, NPCs, sessions, requests, chains); False if absent.

        On PostgreSQL its state row is locked first, as a fenced tick (another
        daemon's) locks it first: such a tick in flight commits before the
        cascade reaches its NPC rows, instead of deadlocking with it.
        """
        if conn.dialect.name == "postgresql":
            state = sa.select(world_states.c.world_id).where(world_states.c.world_id == world_id)
            await conn.execute(state.with_for_update())
        deleted = await conn.execute(sa.delete(worlds).where(worlds.c.id == world_id).returning(worlds.c.id))
        return deleted.first() is not None

    async def worlds_after(
        self, after: int | None, limit: int, conn: AsyncConnection | None = None
    ) -> list[StoredWorld]:
        """Up to ``limit`` worlds with ids above ``after``, by id (export pages through every world)."""
        query = self._stored_world_query().order_by(worlds.c.id).limit(limit)
        if after is not None:
            query = query.where(worlds.c.id > after)
        async with self.reading(conn) as c:
            rows = (await c.execute(query)).all()
        return [self._stored_world(r) for r in rows]

    async def delete_npc(self, conn: AsyncConnection, world_id: int, npc_id: int) -> bool:
        """Delete an NPC, its interaction cooldowns, and its id from the world's sessions; False if absent.

        Sessions lose the id so that a later NPC given the same id (SQLite
        may reuse the highest) is not in a scene by accident.
        """
        query = sa.delete(npcs).where(npcs.c.id == npc_id, npcs.c.world_id == world_id).returning(npcs.c.id)
        if (await conn.execute(query)).first() is None:
            return False
        await conn.execute(
            sa.delete(interaction_cooldowns).where(
                interaction_cooldowns.c.world_id == world_id, interaction_cooldowns.c.npc_id == npc_id
            )
        )
        for session in await self.world_sessions(world_id, conn):
            scene, involved = session["scene_npc_ids"], session["involved_npc_ids"]
            if npc_id in scene or npc_id in involved:
                await conn.execute(
                    sa.update(sessions)
                    .where(sessions.c.id == session["id"])
                    .values(
                        scene_npc_ids=[i for i in scene if i != npc_id],
                        involved_npc_ids=[i for i in involved if i != npc_id],
                        updated_at=wall_now(),
                    )
                )
        return True

    # ---------------------------------------------------------- sessions
    @staticmethod
    async def resolve_npc_refs(conn: AsyncConnection, world_id: int, refs: Iterable[int | str]) -> dict[int | str, int]:
        """``{reference: daemon id}`` of NPC references of one world; :class:`UnknownNpcsError` lists the rest.

        On PostgreSQL the NPCs found are locked against a delete until the
        caller commits, so a session never keeps the id of an NPC deleted meanwhile.
        """
        wanted = list(dict.fromkeys(refs))
        ids = [r for r in wanted if isinstance(r, int)]
        externals = [r for r in wanted if isinstance(r, str)]
        found: dict[int | str, int] = {}
        base = sa.select(npcs.c.external_id, npcs.c.id).where(npcs.c.world_id == world_id)
        if conn.dialect.name == "postgresql":
            base = base.with_for_update(key_share=True)
        for start in range(0, len(ids), IDS_PER_STATEMENT):
            query = base.where(npcs.c.id.in_(ids[start : start + IDS_PER_STATEMENT]))
            found.update({int(i): int(i) for _, i in (await conn.execute(query)).all()})
        for start in range(0, len(externals), IDS_PER_STATEMENT):
            query = base.where(npcs.c.external_id.in_(externals[start : start + IDS_PER_STATEMENT]))
            found.update({str(e): int(i) for e, i in (await conn.execute(query)).all()})
        missing = [r for r in wanted if r not in found]
        if missing:
            raise UnknownNpcsError(world_id, missing)
        return found

    @staticmethod
    async def resolve_session(conn: AsyncConnection, world_id: int, ref: int | str) -> int:
        """The daemon id of a session of this world; raises :class:`SessionNotFoundError`."""
        key = sessions.c.id == ref if isinstance(ref, int) else sessions.c.external_id == ref
        found = (
            await conn.execute(sa.select(sessions.c.id).where(sessions.c.world_id == world_id, key))
        ).scalar_one_or_none()
        if found is None:
            raise SessionNotFoundError(world_id, ref)
        return int(found)

    async def upsert_session(self, conn: AsyncConnection, world_id: int, columns: Mapping[str, Any]) -> Upserted:
        """Open or update a session: ``user_id``, ``location``, ``scene_npc_ids``, ``involved_npc_ids``, ``active``.

        Matched by ``external_id`` (inserted when new), else by ``id`` (which
        must exist: :class:`SessionNotFoundError`); ``active`` defaults to
        true (re-opens a closed session). NPC lists hold references (ids or
        external ids), stored as daemon ids in the order given;
        :class:`UnknownNpcsError` lists those that do not exist. An ``id`` and
        an ``external_id`` of two different sessions: :class:`ExternalIdTakenError`.
        """
        session_id, external_id = columns.get("id"), columns.get("external_id")
        target: int | None = None
        if external_id is not None:
            query = sa.select(sessions.c.id).where(
                sessions.c.world_id == world_id, sessions.c.external_id == external_id
            )
            found = (await conn.execute(query)).scalar_one_or_none()
            if found is not None:
                target = int(found)
                if session_id is not None and session_id != target:
                    raise ExternalIdTakenError("session", external_id, target)
        if target is None and session_id is not None:
            target = await self.resolve_session(conn, world_id, session_id)
        scene = list(columns.get("scene_npc_ids") or [])
        involved = list(columns.get("involved_npc_ids") or [])
        ids = await self.resolve_npc_refs(conn, world_id, [*scene, *involved])
        values = {
            "user_id": columns["user_id"],
            "location": columns.get("location"),
            "scene_npc_ids": list(dict.fromkeys(ids[r] for r in scene)),
            "involved_npc_ids": list(dict.fromkeys(ids[r] for r in involved)),
            "active": bool(columns.get("active", True)),
        }
        if external_id is not None:
            values["external_id"] = external_id
        if target is None:
            insert = sa.insert(sessions).values(world_id=world_id, **values).returning(sessions.c.id)
            return Upserted(int((await conn.execute(insert)).scalar_one()), True)
        await conn.execute(
            sa.update(sessions)
            .where(sessions.c.id == target, sessions.c.world_id == world_id)
            .values(**values, updated_at=wall_now())
        )
        return Upserted(target, False)

    @staticmethod
    async def close_session(conn: AsyncConnection, world_id: int, session_id: int) -> bool:
        """Mark a session inactive (the row stays: its generation requests and chains refer to it).

        True if it was active; closing a closed session changes nothing.
        """
        closed = await conn.execute(
            sa.update(sessions)
            .where(sessions.c.id == session_id, sessions.c.world_id == world_id, sessions.c.active.is_(True))
            .values(active=False, updated_at=wall_now())
            .returning(sessions.c.id)
        )
        return closed.first() is not None

    async def world_sessions(
        self, world_id: int, conn: AsyncConnection | None = None, *, ids: Iterable[int] | None = None
    ) -> list[dict[str, Any]]:
        """The world's sessions (or those of ``ids``), active and closed, by id, as column dicts."""
        query = _session_select().where(sessions.c.world_id == world_id).order_by(sessions.c.id)
        if ids is not None:
            query = query.where(sessions.c.id.in_(sorted(ids)))
        async with self.reading(conn) as c:
            rows = (await c.execute(query)).mappings().all()
        return [session_columns(r) for r in rows]
