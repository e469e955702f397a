"""Which database errors are transient (worth retrying the whole unit of work)."""

from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

# SQLSTATE classes/codes that mean "try again": connection exceptions (08),
# serialization failure / deadlock (40001, 40P01), admin shutdown / crash
# recovery / cannot connect now (57P01..57P03).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03", "55P03"}


def is_transient(exc: BaseException) -> bool:
    """True for disconnects, refused connections, serialization failures, busy SQLite."""
    orig: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    if isinstance(orig, psycopg.OperationalError):
        return True
    if isinstance(orig, psycopg.Error):
        code = orig.sqlstate or ""
        return code.startswith("08") or code in _TRANSIENT_SQLSTATES
    if isinstance(orig, sqlite3.OperationalError):
        return "locked" in str(orig) or "busy" in str(orig)
    return isinstance(orig, ConnectionError | OSError | TimeoutError)


def is_database_error(exc: BaseException) -> bool:
    """True for any error raised by the database layer (counted in ``worldsched_db_errors_total``)."""
    return isinstance(exc, sa_exc.SQLAlchemyError | sqlite3.Error | psycopg.Error) or is_transient(exc)
