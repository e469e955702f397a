"""The SQLite single-instance lock: one daemon per database file (leases need PostgreSQL)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from scheduler_daemon.exits import EXIT_ALREADY_RUNNING, EXIT_DATABASE, StartupError


def lock_sqlite_database(url: str) -> int | None:
    """Hold an exclusive ``flock`` on ``<database>.lock`` for the life of the process.

    SQLite is single-instance: leases need PostgreSQL. Returns the lock's
    file descriptor (keep it open; the kernel releases the lock when the
    process exits, however it exits), or ``None`` for non-file databases.
    """
    database = make_url(url).database
    if not url.startswith("sqlite") or not database or database == ":memory:" or database.startswith("file:"):
        return None
    # The real file, not the spelling of its path: a symlink or a relative
    # path to the same database must find the same lock.
    database = str(Path(database).resolve())
    lock_path = f"{database}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create lock file {lock_path}: {exc.strerror or exc}", EXIT_DATABASE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another scheduler-daemon is already running on the SQLite database {database} "
            f"(it holds {lock_path}); SQLite is single-instance, use PostgreSQL to run several daemons",
            EXIT_ALREADY_RUNNING,
        ) from None
    return fd
