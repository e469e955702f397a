"""The tick's statements on psycopg's own cursor drop a connection that cannot write, like SQLAlchemy's do.

After a failover a pooled session can be left read-only (a demoted primary).
The NPC write runs on the driver's cursor (store/ticks.py), outside
SQLAlchemy's error handling, so it must drop that session itself: else every
later tick fails on it while the pre-ping's ``SELECT 1`` keeps it pooled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import sqlalchemy as sa

from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.errors import is_transient
from scheduler_daemon.store.repository import Store
from tests.conftest import libpq
from tests.store.test_db_write_refused import _pooled_sessions, _read_only_default


@pytest.fixture
def pg_url(pg_scratch_url: str) -> str:
    """A database of the test's own: the test changes its defaults."""
    return pg_scratch_url


@pytest.fixture
def admin(pg_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
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


@pytest.mark.postgres
async def test_a_tick_refused_on_a_read_only_session_drops_it_and_the_next_tick_commits(
    store: Store, admin: psycopg.Connection[tuple[object, ...]], pg_url: str
) -> None:
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
