"""PostgreSQL change notifications: which writes notify (migration 0011), the listener, its reconnects.

Rows written with plain SQL on connections of the test's own, as a game
backend would; the runner uses a virtual clock that stands still with an
hour-long discovery interval, so only a notification can bring a change in.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
import sqlalchemy as sa
import structlog.testing

from scheduler_daemon.change_listener import ChangeListener
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.notifications import APPLICATION_NAME, CHANNEL, ChangeNotifications
from scheduler_daemon.store.repository import Store
from tests.conftest import libpq
from tests.support.helpers import make_world, npc_rows

pytestmark = pytest.mark.postgres

NO_POLL = RunnerLimits(discovery_interval_seconds=3600, tier_refresh_max_seconds=3600)


def url_of(store: Store) -> str:
    return store.engine.url.render_as_string(hide_password=False)


@pytest.fixture
async def listening(pg_store: Store) -> AsyncIterator[ChangeNotifications]:
    notifications = ChangeNotifications(url_of(pg_store))
    await notifications.listen()
    try:
        yield notifications
    finally:
        await notifications.close()


async def sql(store: Store, statement: str, **params: object) -> None:
    """A write on a connection of its own (psycopg, not the daemon's pool), committed."""
    async with await psycopg.AsyncConnection.connect(libpq(url_of(store)), autocommit=True) as conn:
        await conn.execute(statement, params)


_markers = itertools.count()


async def notified(store: Store, notifications: ChangeNotifications) -> set[str]:
    """Everything notified since the last call.

    Read up to a marker notified now: notifications reach a listener in commit
    order, so no quiet period has to be guessed (a late one would be missed).
    """
    marker = f"marker-{next(_markers)}"
    await sql(store, "SELECT pg_notify(%(c)s, %(m)s)", c=CHANNEL, m=marker)
    out: set[str] = set()
    while marker not in out:
        payloads = await notifications.receive(wait=30, window=0, limit=1000)
        assert payloads, "the marker notification never arrived"
        out.update(payloads)
    return out - {marker}


async def test_writes_that_change_what_a_world_runs_notify_its_id(
    pg_store: Store, listening: ChangeNotifications
) -> None:
    store = pg_store
    a, (npc,) = await make_world(store, name="a", npcs_per_tier={Tier.AMBIENT: 1})
    b, _ = await make_world(store, name="b", session=False)
    assert await notified(store, listening) == {str(a), str(b)}  # created: worlds, NPCs, a session

    await sql(store, "UPDATE sessions SET location = 'tavern' WHERE world_id = %(w)s", w=a)
    assert await notified(store, listening) == {str(a)}
    await sql(store, "UPDATE sessions SET updated_at = now() WHERE world_id = %(w)s", w=a)
    assert await notified(store, listening) == set()  # nothing tiering reads changed
    await sql(store, "UPDATE sessions SET location = location WHERE world_id = %(w)s", w=a)
    assert await notified(store, listening) == set()  # the same value again
    await sql(store, "UPDATE npcs SET home = 'tavern' WHERE id = %(n)s", n=npc)
    assert await notified(store, listening) == {str(a)}
    await sql(store, "UPDATE npcs SET world_id = %(b)s WHERE id = %(n)s", b=b, n=npc)
    assert await notified(store, listening) == {str(a), str(b)}  # left one world, joined another
    await sql(store, "UPDATE npcs SET location = 'square', energy = 5 WHERE id = %(n)s", n=npc)
    assert await notified(store, listening) == set()  # columns ticks write: covered by the poll only
    await sql(store, "UPDATE worlds SET meta = meta || '{\"x\": 1}' WHERE id = %(b)s", b=b)
    assert await notified(store, listening) == {str(b)}
    await sql(store, "DELETE FROM npcs WHERE id = %(n)s", n=npc)
    assert await notified(store, listening) == {str(b)}
    await sql(store, "DELETE FROM worlds WHERE id = %(a)s", a=a)
    assert await notified(store, listening) == {str(a)}
    await sql(store, "SELECT pg_notify(%(c)s, %(w)s)", c=CHANNEL, w=str(b))  # what a game can send itself
    assert await notified(store, listening) == {str(b)}


async def test_ticks_and_tier_assignments_notify_nothing(pg_store: Store, listening: ChangeNotifications) -> None:
    store = pg_store
    worlds = [
        (await make_world(store, name=f"w{i}", npcs_per_tier={Tier.DETAILED: 2, Tier.ACTIVE: 2, Tier.AMBIENT: 4}))[0]
        for i in range(2)
    ]
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock, limits=NO_POLL)
    await runner.discover()
    await notified(store, listening)  # the setup's own writes

    # An NPC walks to the player by a write no trigger covers: the forced
    # recomputation writes new tiers, which must stay quiet too.
    async with store.transaction() as conn:
        await conn.execute(
            sa.text("UPDATE npcs SET location = 'square' WHERE world_id = :w AND tier = :t"),
            {"w": worlds[0], "t": int(Tier.AMBIENT)},
        )
    await runner.apply_changes(worlds)
    assert {Tier(r[1]) for r in await npc_rows(store, worlds[0])} == {Tier.DETAILED, Tier.ACTIVE}
    await runner.run_until(60.0)
    assert runner.ticks_ok == 120 and runner.ticks_failed == 0
    await runner.discover()
    assert await notified(store, listening) == set()


async def _until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_session_inserted_with_sql_reaches_the_tiers_without_a_poll(pg_store: Store) -> None:
    store = pg_store
    world_id, _ = await make_world(store, simulation={"alwaysOn": True}, session=False)
    (npc,) = await store.add_npcs(world_id, [{"name": "barkeep", "home": "tavern"}])
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=NO_POLL)
    listener = ChangeListener(ChangeNotifications(url_of(store)), runner)
    tasks = [asyncio.create_task(runner.start()), asyncio.create_task(listener.run())]
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        await asyncio.wait_for(listener.listening.wait(), timeout=30)
        assert runner.world_ids == [world_id]
        await sql(
            store,
            "INSERT INTO sessions (world_id, user_id, location, scene_npc_ids, involved_npc_ids) "
            "VALUES (%(w)s, 'player', 'tavern', '[]', '[]')",
            w=world_id,
        )

        async def promoted() -> bool:
            return {int(r[0]): Tier(r[1]) for r in await npc_rows(store, world_id)}[npc] == Tier.ACTIVE

        await _until(promoted, "the session never reached the tiers")  # home at the player's location
        assert runner.changes_applied >= 1 and listener.received >= 1
    finally:
        runner.stop()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_metrics_count_notifications_and_applied_changes(pg_store: Store) -> None:
    store = pg_store
    world_id, _ = await make_world(store, simulation={"alwaysOn": True}, session=False)
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=NO_POLL)
    await runner.discover()
    listener = ChangeListener(ChangeNotifications(url_of(store)), runner)
    metrics = SchedulerMetrics(version="x", runner=runner, changes=listener, process_collectors=False)

    def sample(name: str) -> float:
        (family,) = [f for f in metrics.registry.collect() if f.name == name]
        (only,) = [s for s in family.samples if not s.name.endswith("_created")]
        return float(only.value)

    assert sample("worldsched_change_listener_up") == 0
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), timeout=30)
        assert sample("worldsched_change_listener_up") == 1
        await sql(store, "UPDATE worlds SET meta = meta || '{\"x\": 1}' WHERE id = %(w)s", w=world_id)

        async def applied() -> bool:
            return sample("worldsched_world_changes_applied") == 1

        await _until(applied, "the notified change was not applied")
        assert sample("worldsched_change_notifications") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sample("worldsched_change_listener_up") == 0


async def test_listener_reconnects_once_per_outage_and_discovers_what_it_missed(pg_scratch_url: str) -> None:
    store = Store.from_url(pg_scratch_url)
    await store.upgrade()
    database = sa.engine.make_url(pg_scratch_url).database
    admin = await psycopg.AsyncConnection.connect(
        libpq(pg_scratch_url.rsplit("/", 1)[0] + "/postgres"), autocommit=True
    )
    writer = await psycopg.AsyncConnection.connect(libpq(pg_scratch_url), autocommit=True)
    world_id, _ = await make_world(store, session=False)
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=NO_POLL)
    listener = ChangeListener(ChangeNotifications(pg_scratch_url), runner)
    tasks = [asyncio.create_task(runner.start()), asyncio.create_task(listener.run())]
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(runner.discovered.wait(), timeout=30)
            await asyncio.wait_for(listener.listening.wait(), timeout=30)
            assert runner.world_ids == []
            # Nobody may reconnect for a while: the outage lasts several attempts.
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute(  # this database's listener only: other tests' may share the server
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
                (APPLICATION_NAME, database),
            )

            async def down_for_three_attempts() -> bool:
                return listener._failed_attempts >= 3

            await _until(down_for_three_attempts, "the listener did not notice its connection was gone")
            # Notified while nobody listens: lost. Only a discovery pass can find it.
            await writer.execute(
                "INSERT INTO sessions (world_id, user_id, scene_npc_ids, involved_npc_ids) "
                "VALUES (%s, 'p', '[]', '[]')",
                (world_id,),
            )
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

            async def registered() -> bool:
                return runner.world_ids == [world_id]

            await _until(registered, "the world changed during the outage was not discovered after it")
        events = [e["event"] for e in logs if e["event"].startswith("change_notifications_")]
        assert events == [
            "change_notifications_listening",
            "change_notifications_interrupted",
            "change_notifications_resumed",
        ]
    finally:
        runner.stop()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
        await writer.close()
        await store.dispose()


async def test_a_first_listen_after_the_loop_started_discovers_what_came_before(pg_store: Store) -> None:
    """The daemon waits only so long for its first LISTEN: a change made before it is found by discovery."""
    store = pg_store
    world_id, _ = await make_world(store, session=False)
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=NO_POLL)
    listener = ChangeListener(ChangeNotifications(url_of(store)), runner)
    tasks = [asyncio.create_task(runner.start())]
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        assert runner.world_ids == []
        await store.add_session(world_id, "player")  # notified while nobody listens
        tasks.append(asyncio.create_task(listener.run()))

        async def registered() -> bool:
            return runner.world_ids == [world_id]

        await _until(registered, "the change made before the first LISTEN was not discovered")
    finally:
        runner.stop()
        tasks[-1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_payloads_that_are_not_world_ids_are_ignored(pg_store: Store) -> None:
    store = pg_store
    world_id, _ = await make_world(store, simulation={"alwaysOn": True}, session=False)
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=NO_POLL)
    await runner.discover()
    listener = ChangeListener(ChangeNotifications(url_of(store)), runner)
    task = asyncio.create_task(listener.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(listener.listening.wait(), timeout=30)
            await sql(
                store,
                "SELECT pg_notify(%(c)s, 'tavern'), pg_notify(%(c)s, '99999999999'), pg_notify(%(c)s, %(w)s)",
                c=CHANNEL,
                w=str(world_id),
            )

            async def applied() -> bool:
                return runner.changes_applied == 1

            await _until(applied, "the valid notification was not applied")
        assert [e for e in logs if e["log_level"] == "error"] == []  # an out-of-range id never reaches a query
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [(e["event"], e["payload"], e["ignored"]) for e in warnings] == [
            ("change_notification_ignored", "tavern", 2)
        ]
        assert warnings[0]["channel"] == CHANNEL
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_ingest_update_of_columns_ticks_write_notifies_its_world(
    pg_store: Store, listening: ChangeNotifications
) -> None:
    # An NPC moved through the API (or an import) on a daemon that does not own the world: the
    # owner must hear of it, although the triggers leave the columns ticks write alone.
    store = pg_store
    world_id, (npc,) = await make_world(store, name="a", npcs_per_tier={Tier.AMBIENT: 1})
    await notified(store, listening)
    async with store.transaction() as conn:
        await store.upsert_npcs(conn, world_id, [{"id": npc, "location": "square", "energy": 5.0}])
    assert await notified(store, listening) == {str(world_id)}
    async with store.transaction() as conn:
        await store.upsert_npcs(conn, world_id, [{"name": "new"}])  # an insert: the trigger's
    assert await notified(store, listening) == {str(world_id)}
