"""Which database a URL names, said without its password, and what stops SQLite from opening its file.

Connection errors name the database they tried: a SQLite file's path, or a
PostgreSQL database with its host, port and user (never the password).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url


def describe_database(url: str) -> str:
    """``SQLite file /var/lib/x.db`` or ``PostgreSQL database db on host:5432 as user u``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        return f"SQLite file {path}" if path is not None else "SQLite in memory"
    # libpq's defaults when the URL leaves them out: the local socket, 5432, the OS user.
    host = parsed.host or parsed.query.get("host") or "the local socket"
    where = f"{host}:{parsed.port or 5432}" if parsed.host else str(host)
    user = f" as user {parsed.username}" if parsed.username else ""
    return f"PostgreSQL database {parsed.database or '(default)'} on {where}{user}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; ``None`` for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)


def sqlite_open_problem(url: str) -> str | None:
    """Why SQLite cannot open or create the URL's file, as seen on the file system; ``None`` if nothing is visible.

    These are not transient: waiting does not create a directory or grant a
    permission, so callers fail at once instead of retrying.
    """
    path = sqlite_path(url)
    if path is None:
        return None
    parent = path.parent
    if not parent.exists():
        return f"its directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"no permission to read and write {path}"
        return None
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create a file in {parent}"
    return None
