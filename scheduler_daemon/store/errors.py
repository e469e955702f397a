"""Which database errors are transient (worth retrying the whole unit of work), and which need a new connection."""

from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

# SQLSTATEs after which a connection can no longer write, so only a new
# connection can succeed: read-only transaction (a demoted primary, a hot
# standby, ``default_transaction_read_only``), admin shutdown, crash shutdown,
# cannot connect now (starting up, in recovery, shutting down), database
# dropped (a standby's recovery conflict). Class 08 (connection exception) too.
_RECONNECT_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03", "57P04"})
# A standby cancels or ends sessions "due to conflict with recovery" under
# SQLSTATE 40001, which alone means an ordinary serialization failure.
_RECOVERY_CONFLICT = "conflict with recovery"
# Also worth a retry on the same connection: serialization failure, deadlock, lock not available.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def needs_new_connection(exc: BaseException) -> bool:
    """True for a PostgreSQL error after which the connection that raised it cannot write.

    The engine treats these as disconnects (see
    :func:`~scheduler_daemon.store.database.create_engine`): the connection and
    every older one in the pool are dropped, so the next attempt reconnects,
    and reaches the new primary after a failover. ``exc`` is the driver's
    exception (``DBAPIError.orig``).
    """
    if not isinstance(exc, psycopg.Error):
        return False
    code = exc.sqlstate or ""
    return code.startswith("08") or code in _RECONNECT_SQLSTATES or (code == "40001" and _RECOVERY_CONFLICT in str(exc))


def is_transient(exc: BaseException) -> bool:
    """True for disconnects, refused connections, connections that cannot write, serialization failures, busy SQLite."""
    orig: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    if isinstance(orig, psycopg.OperationalError):
        return True
    if isinstance(orig, psycopg.Error):
        return (orig.sqlstate or "") in _TRANSIENT_SQLSTATES or needs_new_connection(orig)
    if isinstance(orig, sqlite3.OperationalError):
        return "locked" in str(orig) or "busy" in str(orig)
    return isinstance(orig, ConnectionError | OSError | TimeoutError)


def is_database_error(exc: BaseException) -> bool:
    """True for any error raised by the database layer (counted in ``worldsched_db_errors_total``)."""
    return isinstance(exc, sa_exc.SQLAlchemyError | sqlite3.Error | psycopg.Error) or is_transient(exc)


def error_class(exc: BaseException) -> str:
    """The driver's error class under SQLAlchemy's wrapper (``ReadOnlySqlTransaction``, not ``InternalError``)."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else None
    return type(orig if orig is not None else exc).__name__
