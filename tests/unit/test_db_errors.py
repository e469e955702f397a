"""Which database errors mean the connection must be replaced, told from the drivers' own exceptions."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from scheduler_daemon.store.errors import is_transient, needs_new_connection


@pytest.mark.parametrize(
    ("sqlstate", "message", "reconnect"),
    [
        ("25006", "cannot execute UPDATE in a read-only transaction", True),
        ("57P01", "terminating connection due to administrator command", True),
        ("57P02", "terminating connection because of crash of another server process", True),
        ("57P03", "the database system is in recovery mode", True),
        ("57P04", "terminating connection due to conflict with recovery", True),
        ("08006", "server closed the connection unexpectedly", True),
        ("40001", "canceling statement due to conflict with recovery", True),
        ("40001", "could not serialize access due to concurrent update", False),
        ("40P01", "deadlock detected", False),
        ("23505", "duplicate key value violates unique constraint", False),
        ("22012", "division by zero", False),
    ],
)
def test_errors_that_need_a_new_connection(sqlstate: str, message: str, reconnect: bool) -> None:
    # The driver's own exception classes, as psycopg raises them for these SQLSTATEs.
    error = psycopg.errors.lookup(sqlstate)(message)
    assert needs_new_connection(error) is reconnect
    if reconnect:
        assert is_transient(error), "a unit of work that lost its connection is worth retrying"


def test_sqlite_and_other_errors_never_need_a_new_connection() -> None:
    assert not needs_new_connection(sqlite3.OperationalError("attempt to write a readonly database"))
    assert not needs_new_connection(ConnectionResetError("gone"))
