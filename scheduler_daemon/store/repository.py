"""``Store``: the whole database access of the daemon, composed from one part per concern.

Each part builds the SQL of its own tables (:mod:`~scheduler_daemon.store.worlds`,
:mod:`~scheduler_daemon.store.sessions`, :mod:`~scheduler_daemon.store.npcs`,
:mod:`~scheduler_daemon.store.ticks`). Statements that run inside a caller's
transaction take its open connection; the others open their own.
"""

from __future__ import annotations

from scheduler_daemon.store.npcs import Npcs
from scheduler_daemon.store.sessions import Sessions
from scheduler_daemon.store.ticks import Ticks
from scheduler_daemon.store.worlds import Worlds

__all__ = ["Store"]


class Store(Worlds, Sessions, Npcs, Ticks):
    """Database access for the scheduler (PostgreSQL via psycopg 3, or SQLite)."""
