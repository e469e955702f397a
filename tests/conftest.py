"""Shared fixtures: a real database per backend (SQLite file, PostgreSQL database).

PostgreSQL tests read ``SCHEDULER_TEST_POSTGRES_URL`` (any database on the
server; each test run creates and drops its own database next to it). Unset:
they skip with a reason, except under ``CI=true`` where that is a failure;
so does an unreachable server.

Fixtures: ``backend`` (``sqlite``, ``postgres``), ``store`` (migrated and
empty, on each backend), ``db_url`` (the same database as a URL),
``pg_store`` (PostgreSQL only), ``pg_database_url`` (this session's
PostgreSQL database), ``pg_scratch_url`` (an empty PostgreSQL database of
the test's own), ``redis_url`` (``SCHEDULER_TEST_REDIS_URL``, default the
local Redis; unreachable: skip, or fail under ``CI=true``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from sqlalchemy.engine import make_url

from scheduler_daemon.logs import PACKAGE_LOGGER
from scheduler_daemon.store.repository import Store

# In-process tests log through structlog's default pipeline, whose console
# renderer draws rich tracebacks with every frame's locals: most of the time
# of runner tests that log failed ticks. Plain tracebacks, as the daemon
# renders them (logs.py); the rest of the default pipeline stays.
_DEFAULT_PROCESSORS = structlog.get_config()["processors"]
assert isinstance(_DEFAULT_PROCESSORS[-1], structlog.dev.ConsoleRenderer)
structlog.configure(
    processors=[
        *_DEFAULT_PROCESSORS[:-1],
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
    ]
)
# The package's lines go through the stdlib logger of their name (logs.py):
# INFO and up reach structlog's processors (capture_logs), as in the daemon.
logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO)
_LOGGERS = ("", PACKAGE_LOGGER, "sqlalchemy", "sqlalchemy.engine", "aiosqlite", "asyncio", "uvicorn", "alembic")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A CLI command run in-process configures logging onto its captured stderr: undone after each test."""
    config = structlog.get_config()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg, lg.level, lg.handlers[:]) for lg in loggers]
    yield
    structlog.configure(**config)
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


PG_ENV = "SCHEDULER_TEST_POSTGRES_URL"
TABLES_IN_DELETE_ORDER = (
    "generation_requests",
    "interaction_chains",
    "interaction_cooldowns",
    "npcs",
    "sessions",
    "world_states",
    "worlds",
    "scheduler_instances",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_postgres_url() -> str:
    """The server URL from the environment, or skip/fail as the rules say."""
    url = os.environ.get(PG_ENV)
    if not url:
        if _in_ci():
            pytest.fail(f"{PG_ENV} is not set but CI=true: PostgreSQL tests must run in CI")
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1/test)")
    return url


def libpq(url: str) -> str:
    """``url`` as libpq takes it (no SQLAlchemy driver name)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_pg_database(server_url: str, prefix: str = "sched_test") -> str:
    """A fresh, empty database next to ``server_url``'s (dropped by :func:`drop_pg_database`).

    An unreachable server skips the test, or fails it under CI.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(libpq(server_url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL at {PG_ENV} is unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ENV} is unreachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return (
        make_url(server_url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    )


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(libpq(url.rsplit("/", 1)[0] + "/postgres"), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


REDIS_ENV = "SCHEDULER_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def require_redis_url() -> str:
    """``SCHEDULER_TEST_REDIS_URL`` (default: the local Redis) if it answers; else skip, or fail under CI."""
    import redis

    url = os.environ.get(REDIS_ENV) or DEFAULT_REDIS_URL
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5) as client:
            client.ping()
    except redis.RedisError as exc:
        if _in_ci():
            pytest.fail(f"Redis at {url} ({REDIS_ENV}) is unreachable in CI: {exc}")
        pytest.skip(f"Redis tests need a Redis server at {url} (set {REDIS_ENV}): {exc}")
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis server the ARQ tests use (each test keeps to a namespace of its own)."""
    return require_redis_url()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    return require_postgres_url()


@pytest.fixture(scope="session")
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database for this test session (concurrent runs don't collide)."""
    url = create_pg_database(pg_server_url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def pg_scratch_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, empty (not migrated), dropped afterwards.

    For tests that change database-wide settings, which must not leak into other tests.
    """
    url = create_pg_database(require_postgres_url())
    try:
        yield url
    finally:
        drop_pg_database(url)


_pg_migrated: set[str] = set()


async def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """A migrated, empty store on the given backend."""
    if backend == "sqlite":
        store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}")
        await store.upgrade()
        return store
    url: str = request.getfixturevalue("pg_database_url")
    store = Store.from_url(url)
    if url not in _pg_migrated:
        await store.upgrade()
        _pg_migrated.add(url)
    async with store.transaction() as conn:
        from sqlalchemy import text

        await conn.execute(text(f"TRUNCATE {', '.join(TABLES_IN_DELETE_ORDER)} RESTART IDENTITY CASCADE"))
        # Fault-injection triggers survive TRUNCATE; a failed test must not leak one.
        for table in ("npcs", "world_states"):
            await conn.execute(text(f"DROP TRIGGER IF EXISTS inject_fault ON {table}"))
    return store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_postgres_url()
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    s = await make_store(backend, tmp_path, request)
    try:
        yield s
    finally:
        await s.dispose()


@pytest.fixture
async def pg_store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated, empty store on PostgreSQL only (what SQLite does not have: leases, row locks, triggers)."""
    require_postgres_url()
    store = await make_store("postgres", tmp_path, request)
    try:
        yield store
    finally:
        await store.dispose()


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database URL (not yet migrated for SQLite; PostgreSQL is emptied by `store`)."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}"
    return str(request.getfixturevalue("pg_database_url"))
