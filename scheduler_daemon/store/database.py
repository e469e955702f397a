"""Engine creation and per-backend connection setup."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from scheduler_daemon.store import state_json
from scheduler_daemon.store.errors import DatabaseURLError, needs_new_connection
from scheduler_daemon.store.pg_arrays import register_packed_arrays
from scheduler_daemon.store.target import hide_password

SUPPORTED_DRIVERS = ("postgresql+psycopg", "sqlite+aiosqlite")
#: How to install PostgreSQL support; the default install runs on SQLite only.
POSTGRES_EXTRA_INSTALL: Final = "pip install 'scheduler-daemon[postgres]'"


def normalize_url(url: str) -> str:
    """Check a database URL; ``postgresql://`` is taken to mean psycopg 3."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseURLError(f"invalid database URL {hide_password(url)!r}: {hide_password(str(exc))}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise DatabaseURLError(
            f"unsupported database driver {parsed.drivername!r} in URL; "
            f"use one of {', '.join(d + '://' for d in SUPPORTED_DRIVERS)}"
        )
    if parsed.drivername == "postgresql+psycopg":
        _require_psycopg()
    return parsed.render_as_string(hide_password=False)


def _require_psycopg() -> None:
    # Said when the URL is read (the config's database.url), not at the first connection.
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise DatabaseURLError(
            f"a postgresql URL needs the PostgreSQL driver psycopg, which is not installed ({exc}); "
            f"install the postgres extra: {POSTGRES_EXTRA_INSTALL}"
        ) from None


def _sqlite_json(value: Any) -> str:
    # UTF-8 with PostgreSQL's jsonb separators, so a size limit (store/base.py)
    # counts the same bytes on both: escaped, a character took up to six. A
    # lone surrogate (UTF-8 has none; rows from before the API refused it) stays escaped.
    text = json.dumps(value, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(value)
    return text


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets other processes read while the daemon writes; foreign keys are
    # off by default in SQLite; busy_timeout rides out short write contention.
    # We issue BEGIN ourselves (see _sqlite_on_begin), so switch off the
    # driver's implicit transactions.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


#: Execution option of a connection whose transaction will write (see :func:`begin_writing`).
WRITES: Final = "scheduler_writes"


def _sqlite_on_begin(conn: sa.Connection) -> None:
    # A writing transaction takes the write lock up front (BEGIN IMMEDIATE): a
    # deferred BEGIN that reads and then writes can fail at once with
    # SQLITE_BUSY (no busy wait) when another connection committed in between.
    # Reads stay deferred, so under WAL they never wait for a writer.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITES) else "BEGIN")


def _reconnect_when_writes_refused(context: ExceptionContext) -> None:
    # A session left read-only (a failover's demoted primary, a standby) or
    # being shut down stays in the pool and passes the pre-ping's SELECT 1.
    # Flagged as a disconnect, SQLAlchemy drops it and every older pooled
    # connection, so the next attempt connects anew.
    if needs_new_connection(context.original_exception):
        context.is_disconnect = True


@asynccontextmanager
async def begin_writing(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: committed on normal exit, rolled back on an exception."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**{WRITES: True})
        async with conn.begin():
            yield conn


def create_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    connect_timeout: float = 10.0,
    echo: bool = False,
    idle_in_transaction_timeout: float | None = None,
) -> AsyncEngine:
    """Create the async engine for a supported URL with sane per-backend defaults.

    ``idle_in_transaction_timeout`` (PostgreSQL): the server ends a session
    that sits inside a transaction for longer, releasing its row locks. With
    leases this bounds how long a frozen daemon (SIGSTOP mid-tick) can keep a
    world's state row locked against a new owner.

    PostgreSQL errors that mean "this connection cannot write"
    (:func:`~scheduler_daemon.store.errors.needs_new_connection`) invalidate
    the connection and the pool's older ones, like a lost connection.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, echo=echo, connect_args={"timeout": connect_timeout}, json_serializer=_sqlite_json
        )
        sa.event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, int(connect_timeout)),
        "application_name": "scheduler-daemon",
    }
    if idle_in_transaction_timeout is not None:
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout * 1000)}"
    engine = create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args=connect_args,
    )
    sa.event.listen(engine.sync_engine, "handle_error", _reconnect_when_writes_refused)
    sa.event.listen(engine.sync_engine, "connect", _pg_on_connect)
    return engine


def _pg_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # NPC states decode with orjson (store/state_json.py); the tick's grouped
    # writes send whole columns packed (store/pg_arrays.py).
    from psycopg.types.json import set_json_loads  # the postgres extra: imported for PostgreSQL only

    connection = dbapi_conn.driver_connection
    set_json_loads(state_json.loads, connection)
    register_packed_arrays(connection)
