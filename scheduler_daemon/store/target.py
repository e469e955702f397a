"""Which database a URL names, said without its password, and what stops SQLite from opening its file.

Connection errors name the database they tried: a SQLite file's path, or a
PostgreSQL database with its host, port and user (never the password).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import make_url
from sqlalchemy.util import asbool

#: ``password=`` (also ``sslpassword=``) in a URL's query string: libpq takes it there too.
_QUERY_PASSWORD = re.compile(r"(password=)[^&#]*", re.IGNORECASE)


def hide_password(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@``, ``?password=``) shown as ``***``; also an unparsable URL.

    For messages and logs: the text of a URL that failed to parse is still shown to say what was wrong.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # Up to the last "@": a password may hold any character, "@" and "/" included.
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon and "/" not in user:  # a user name has no "/": else it is a path (SQLite)
            rest = f"{user}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}{sep}{rest}")


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
    """The file of a SQLite URL, also of a ``file:`` URI (``?uri=true``); ``None`` for an in-memory database."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:":
        return None
    if not _is_uri(parsed.query) or not database.startswith("file:"):
        return Path(database)
    # SQLite's URI: file:PATH or file://[localhost]/PATH, percent-encoded; its own options are in the URL's query.
    if parsed.query.get("mode") == "memory" or database.startswith("file::memory:"):
        return None
    rest = database.removeprefix("file:")
    if rest.startswith("//"):
        rest = rest[2:].removeprefix("localhost")
    return Path(unquote(rest))


def _is_uri(query: Mapping[str, str | tuple[str, ...]]) -> bool:
    """Whether the URL's ``uri`` option makes SQLAlchemy hand SQLite a URI (its own boolean rule)."""
    value = query.get("uri", "false")
    return asbool(value if isinstance(value, str) else value[-1])


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
    query = make_url(url).query
    mode = query.get("mode") if _is_uri(query) else None
    if path.exists():
        if mode == "ro":
            return None if os.access(path, os.R_OK) else f"no permission to read {path}"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"no permission to read and write {path}"
        return None
    if mode in ("ro", "rw"):  # SQLite opens such a file, it does not create it
        return f"{path} does not exist (mode={mode})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create a file in {parent}"
    return None
