"""Connections that cannot write are dropped, and readiness says so, against a real PostgreSQL.

A database-wide ``default_transaction_read_only = on`` makes every session
opened afterwards read-only, as on a demoted primary after a failover; a
``RESET`` leaves the sessions already open read-only. Each test gets a
database of its own, since it changes that database's defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from scheduler_daemon.admin import WorldAdmin
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.http.routes import create_app
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.errors import is_transient
from scheduler_daemon.store.repository import Store
from tests.conftest import libpq


@pytest.fixture
def pg_url(pg_scratch_url: str) -> str:
    """A database of the test's own (tests/conftest.py): these tests change its defaults."""
    return pg_scratch_url


@pytest.fixture
def admin(pg_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """The test's own session: read-write whatever the database's default says."""
    with psycopg.connect(libpq(pg_url), autocommit=True, options="-c default_transaction_read_only=off") as conn:
        yield conn


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(pg_url)
    try:
        await store.upgrade()
        yield store
    finally:
        await store.dispose()


def _read_only_default(admin: psycopg.Connection[tuple[object, ...]], db: str, on: bool) -> None:
    if on:
        admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    else:
        admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')


async def _pooled_sessions(store: Store, n: int) -> list[tuple[int, str]]:
    """``n`` sessions checked out of the pool at once: ``(backend pid, transaction_read_only)`` each."""
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(store.engine.connect()) for _ in range(n)]
        query = sa.text("SELECT pg_backend_pid(), current_setting('transaction_read_only')")
        rows = [(await conn.execute(query)).one() for conn in conns]
    return [(int(pid), str(setting)) for pid, setting in rows]


@pytest.mark.postgres
async def test_a_read_only_session_is_dropped_with_the_older_pooled_ones_and_the_next_write_succeeds(
    store: Store, admin: psycopg.Connection[tuple[object, ...]], pg_url: str
) -> None:
    db = str(sa.make_url(pg_url).database)
    await store.dispose()  # the pool starts empty: every session below opens under the read-only default
    _read_only_default(admin, db, True)
    stale = await _pooled_sessions(store, 2)
    assert [setting for _, setting in stale] == ["on", "on"]
    _read_only_default(admin, db, False)  # and no session killed: the two stay in the pool, read-only

    with pytest.raises(DBAPIError) as refused:
        await store.create_world("refused")
    assert isinstance(refused.value.orig, psycopg.Error) and refused.value.orig.sqlstate == "25006"
    assert refused.value.connection_invalidated
    assert is_transient(refused.value)

    # The next write succeeds at once: the failure also dropped the other session opened before it.
    world_id = await store.create_world("accepted")
    assert (await store.get_world(world_id)).name == "accepted"
    fresh = await _pooled_sessions(store, 2)
    assert [setting for _, setting in fresh] == ["off", "off"]
    assert not {pid for pid, _ in fresh} & {pid for pid, _ in stale}


@pytest.mark.postgres
async def test_an_ordinary_error_keeps_its_connection(store: Store) -> None:
    [(pid, _)] = await _pooled_sessions(store, 1)
    with pytest.raises(DBAPIError) as failed:
        async with store.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1 / 0"))
    assert not failed.value.connection_invalidated
    assert not is_transient(failed.value)
    assert await _pooled_sessions(store, 1) == [(pid, "off")]


@pytest.mark.postgres
async def test_readyz_of_an_idle_daemon_reports_a_read_only_database_and_recovers_after_the_reset(
    store: Store, admin: psycopg.Connection[tuple[object, ...]], pg_url: str
) -> None:
    db = str(sa.make_url(pg_url).database)
    scheduler = WorldScheduler(store)
    runner = SchedulerLoopRunner(scheduler, store, clock=VirtualClock())  # no worlds: no tick to fail
    metrics = SchedulerMetrics(version="test", runner=runner, process_collectors=False)
    app = create_app(WorldAdmin(store, scheduler, runner, metrics), token=lambda: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/readyz")).status_code == 200
        await store.dispose()
        _read_only_default(admin, db, True)
        r = await client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["database"] == "read-only"
        assert r.json()["detail"] == "database refuses writes: read-only transactions"
        # Reset without killing a session: the check dropped the read-only one, so the next one reconnects.
        _read_only_default(admin, db, False)
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["database"] == "ok"
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.postgres
async def test_a_tick_refused_on_a_read_only_session_drops_it_and_the_next_tick_commits(
    store: Store, admin: psycopg.Connection[tuple[object, ...]], pg_url: str
) -> None:
    """The NPC write runs on the driver's cursor (store/ticks.py), outside SQLAlchemy's error handling.

    It must drop a read-only session itself: else every later tick fails on it
    while the pre-ping's ``SELECT 1`` keeps it pooled.
    """
    db = str(sa.make_url(pg_url).database)
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "smith"}])
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    await store.dispose()  # every session below opens under the read-only default
    _read_only_default(admin, db, True)
    stale = await _pooled_sessions(store, 2)
    assert [setting for _, setting in stale] == ["on", "on"]
    _read_only_default(admin, db, False)  # both sessions stay pooled, read-only

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
        await sched.tick_worlds([(world_id, 60.0)])
    assert is_transient(refused.value)

    [done] = await sched.tick_worlds([(world_id, 60.0)])
    assert not isinstance(done, BaseException), done
    assert (await store.get_npcs(world_id, [npc]))[0].decisions == 1
    assert not {pid for pid, _ in await _pooled_sessions(store, 2)} & {pid for pid, _ in stale}
