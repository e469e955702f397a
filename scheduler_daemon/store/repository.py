"""``Store``: the whole database access of the daemon, composed from one part per concern.

Each part builds the SQL of its own tables: :mod:`~scheduler_daemon.store.worlds`,
:mod:`~scheduler_daemon.store.sessions`, :mod:`~scheduler_daemon.store.npcs`,
:mod:`~scheduler_daemon.store.ticks`, :mod:`~scheduler_daemon.store.generation`,
:mod:`~scheduler_daemon.store.chains`, the tick's fence in
:mod:`~scheduler_daemon.store.leases`, and what a game writes and reads by id or
external id in :mod:`~scheduler_daemon.store.ingest`. Statements that run inside a caller's
transaction take its open connection (``store.claim_requests(conn, …)``); the
others open their own.
"""

from __future__ import annotations

from scheduler_daemon.store.chains import Chains
from scheduler_daemon.store.generation import GenerationRequests
from scheduler_daemon.store.ingest import Ingest
from scheduler_daemon.store.leases import Fencing
from scheduler_daemon.store.npcs import Npcs
from scheduler_daemon.store.sessions import Sessions
from scheduler_daemon.store.ticks import Ticks
from scheduler_daemon.store.worlds import Worlds

__all__ = ["Store"]


class Store(Ingest, Worlds, Sessions, Npcs, Ticks, GenerationRequests, Chains, Fencing):
    """Database access for the scheduler (PostgreSQL via psycopg 3, or SQLite)."""
