"""Sessions (players online): adding them, reading the active ones as tiering sees them, a session's user."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation.tiers import SessionView
from scheduler_daemon.store.base import StoreBase, shown
from scheduler_daemon.store.errors import SessionNotFoundError
from scheduler_daemon.store.models import sessions


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
        return None, f"{field}: expected a JSON array of NPC ids, got {shown(raw)}"
    return frozenset(raw), None


def _session_view(row: Sequence[Any], dialect: str) -> SessionView | str:
    """(id, user_id, location, scene_npc_ids, involved_npc_ids) as tiering sees it, or what is wrong with it."""
    scene, problem = _npc_ids(row[3], "scene_npc_ids", dialect)
    involved, problem2 = _npc_ids(row[4], "involved_npc_ids", dialect)
    if scene is None or involved is None:
        return problem or problem2 or "unreadable"
    if row[2] is not None and not isinstance(row[2], str):
        return f"location: expected text, got {shown(row[2])}"
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


class Sessions(StoreBase):
    """The ``sessions`` table."""

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

    async def count_active_sessions(self, world_id: int) -> int:
        """How many active sessions (players online) a world has."""
        query = sa.select(sa.func.count()).where(sessions.c.world_id == world_id, sessions.c.active.is_(True))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

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
    async def session_user(conn: AsyncConnection, world_id: int, session_id: int) -> str:
        """The user of a session of this world; raises :class:`SessionNotFoundError`."""
        user = (
            await conn.execute(
                sa.select(sessions.c.user_id).where(sessions.c.id == session_id, sessions.c.world_id == world_id)
            )
        ).scalar_one_or_none()
        if user is None:
            raise SessionNotFoundError(world_id, session_id)
        return str(user)
