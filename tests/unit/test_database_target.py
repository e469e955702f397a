"""store/target.py: the SQLite file a URL names (plain paths and SQLite ``file:`` URIs) and why it cannot be opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from scheduler_daemon.store.target import describe_database, hide_password, sqlite_open_problem, sqlite_path


def test_plain_paths_absolute_relative_and_in_memory(tmp_path: Path) -> None:
    assert sqlite_path(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") == tmp_path / "a.db"
    assert sqlite_path("sqlite+aiosqlite:///data/a.db") == Path("data/a.db")  # SQLite: relative to the cwd
    for memory in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///file::memory:?uri=true"):
        assert sqlite_path(memory) is None, memory
        assert describe_database(memory) == "SQLite in memory"
    # A new file in an existing directory: SQLite creates it.
    assert sqlite_open_problem(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}") is None


def test_sqlite_uris_name_their_file(tmp_path: Path) -> None:
    db = tmp_path / "dir with space" / "a.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    for url in (
        f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true",
        f"sqlite+aiosqlite:///file://{db}?uri=true",
        f"sqlite+aiosqlite:///file://localhost{db}?uri=1",
        f"sqlite+aiosqlite:///file:{str(db).replace(' ', '%20')}?mode=rw&uri=true",
    ):
        assert sqlite_path(url) == db, url
        assert sqlite_open_problem(url) is None, url
        assert describe_database(url) == f"SQLite file {db}"
    assert sqlite_path("sqlite+aiosqlite:///file:rel.db?uri=true") == Path("rel.db")
    assert sqlite_path("sqlite+aiosqlite:///file:shared?mode=memory&cache=shared&uri=true") is None
    # Without uri=true SQLite takes "file:…" as a plain file name.
    assert sqlite_path("sqlite+aiosqlite:///file:x.db") == Path("file:x.db")


def test_sqlite_uri_problems_name_the_real_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "a.db"
    assert sqlite_open_problem(f"sqlite+aiosqlite:///file:{missing}?uri=true") == (
        f"its directory {missing.parent} does not exist"
    )
    # mode=ro and mode=rw open an existing file only: SQLite does not create it.
    absent = tmp_path / "absent.db"
    for mode in ("ro", "rw"):
        assert sqlite_open_problem(f"sqlite+aiosqlite:///file:{absent}?mode={mode}&uri=true") == (
            f"{absent} does not exist (mode={mode})"
        )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://sched:s3cret@db:5432/sched", "postgresql+psycopg://sched:***@db:5432/sched"),
        ("postgresql+psycopg://sched:s3:c/r@et@db/sched", "postgresql+psycopg://sched:***@db/sched"),
        (
            "postgresql+psycopg://sched@db/sched?password=s3cret&sslmode=require",
            "postgresql+psycopg://sched@db/sched?password=***&sslmode=require",
        ),
        (
            "postgresql+psycopg:///sched?host=/run/pg&sslpassword=s3cret",
            "postgresql+psycopg:///sched?host=/run/pg&sslpassword=***",
        ),
        ("postgresql+psycopg://sched:s3cret@db:54x/sched", "postgresql+psycopg://sched:***@db:54x/sched"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("sqlite+aiosqlite:////var/lib/x.db", "sqlite+aiosqlite:////var/lib/x.db"),
    ],
)
def test_hide_password_in_a_url_even_one_that_does_not_parse(url: str, shown: str) -> None:
    assert hide_password(url) == shown
