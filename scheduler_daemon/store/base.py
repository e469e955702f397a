"""``StoreBase``: the engine, its transactions and connections, and what every part of the store shares.

Shared by the per-concern modules: the size limits on stored JSON, how many
ids one statement may carry, and the checks of stored values for messages.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final, Self

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scheduler_daemon.store import migrate
from scheduler_daemon.store.database import begin_writing, create_engine
from scheduler_daemon.store.errors import needs_new_connection

#: A world's ``meta`` larger than this (bytes of its JSON text) is never loaded:
#: the world is isolated with the reason instead.
MAX_WORLD_META_BYTES: Final = 4 * 1024 * 1024
#: An NPC's ``state`` larger than this is never loaded: the NPC is quarantined.
MAX_NPC_STATE_BYTES: Final = 256 * 1024

#: Ids per ``IN (…)`` list: SQLite binds one parameter each and allows 32,766.
IDS_PER_STATEMENT: Final = 1000
#: Worlds per SQLite statement built as a ``UNION ALL`` of per-world parts:
#: SQLite refuses compound selects of more than 500 terms.
SQLITE_WORLDS_PER_SELECT: Final = 400

# The readiness check's question: would this session's next transaction accept a write?
_WRITABLE_PG: Final = sa.text("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")


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


def shown(value: Any) -> str:
    """A stored value for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what numeric columns must hold (SQLite keeps anything)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


async def driver_execute(conn: AsyncConnection, query: str, params: Sequence[Any], *, binary: bool = False) -> Any:
    """Run ``query`` (prepared) on the psycopg connection under ``conn``, inside the same transaction.

    Returns psycopg's cursor; ``binary``: results in binary format. SQLAlchemy never sees an error raised here, so
    one after which the connection cannot write
    (:func:`~scheduler_daemon.store.errors.needs_new_connection`, e.g. a
    demoted primary's read-only session) or which closed it drops the
    connection and the pool's older ones, as the engine does for its own
    statements (store/database.py).
    """
    import psycopg  # the postgres extra; loaded already, this connection is one of its

    # Inside the caller's transaction the connection is checked out already:
    # read it directly (get_raw_connection() spawns a greenlet every call).
    sync = conn.sync_connection
    raw = sync.connection if sync is not None else await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    try:
        return await driver.execute(query, params, prepare=True, binary=binary)
    except psycopg.Error as exc:
        if needs_new_connection(exc) or driver.closed:
            # What SQLAlchemy does for a disconnect: older pooled sessions are
            # recycled at checkout, this one is dropped.
            conn.sync_engine.pool._invalidate(raw, exc, _checkin=False)
            await conn.invalidate(exc)
        raise


def wall_now() -> datetime:
    # Wall time for humans reading the table; never used for scheduling.
    return datetime.now(UTC)


def dialect_insert(conn: AsyncConnection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's ``INSERT`` for ``table``, which has ``ON CONFLICT`` (both backends support it)."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


class StoreBase:
    """The engine (PostgreSQL via psycopg 3, or SQLite) and how the store's parts use it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # SQLite's single writer, queued in the event loop (see transaction()).
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Self:
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
        lock in SQLite's busy handler, which sleeps up to 100 ms between
        polls. Not reentrant: never open a transaction while holding one.
        """
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, begin_writing(self.engine) as conn:
            yield conn

    @asynccontextmanager
    async def reading(self, conn: AsyncConnection | None = None) -> AsyncIterator[AsyncConnection]:
        """``conn`` (a read inside the caller's transaction) or, without one, a pooled connection of its own."""
        if conn is not None:
            yield conn
            return
        async with self.engine.connect() as own:
            yield own

    def connect(self) -> AsyncConnection:
        """A pooled connection for reads (``async with store.connect() as conn``); it writes nothing."""
        return self.engine.connect()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that all see one snapshot of the database (an export of one world).

        PostgreSQL: a ``REPEATABLE READ`` transaction; SQLite: one deferred
        read transaction, a snapshot under WAL. It writes nothing. While it is
        open it holds back vacuum (PostgreSQL) and checkpoints (SQLite).
        """
        async with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
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

    async def upgrade(self, progress: migrate.MigrationProgress | None = None) -> tuple[set[str], set[str]]:
        """Apply pending migrations; returns (revisions before, revisions after).

        ``progress(done, total, revision)`` is called after each migration applied.
        """
        return await migrate.upgrade(self.engine, progress=progress)

    async def check_schema(self) -> None:
        """Raise :class:`~scheduler_daemon.store.errors.SchemaNotMigratedError` if behind."""
        await migrate.check_schema(self.engine)
