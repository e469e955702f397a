"""World leases on PostgreSQL: claims, renewals, the tick fence, the runner's balancing.

The database clock is substituted (``LeaseStore(now=…)``) so expiry is driven
by the test, not by sleeping; runners use a :class:`VirtualClock`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.exits import EXIT_ALREADY_RUNNING, StartupError
from scheduler_daemon.instance_lock import lock_sqlite_database
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.errors import LeaseLostError, StaleWorldStateError
from scheduler_daemon.store.leases import Lease, LeaseStore, RenewResult, current_owner
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.ticks import WorldAdvance
from tests.support.helpers import live_instances, make_world, npc_rows, world_state

pytestmark = pytest.mark.postgres

TTL = 10.0


class DbClock:
    """A controllable stand-in for the database's ``now()``."""

    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, tzinfo=UTC)

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)

    def sql(self) -> sa.ColumnElement[datetime]:
        return sa.literal(self.t, sa.DateTime(timezone=True))


@pytest.fixture
def pg(pg_store: Store) -> Store:
    """This module's short name for the shared ``pg_store`` (tests/conftest.py)."""
    return pg_store


def lease_store(store: Store, owner: str, clock: DbClock) -> LeaseStore:
    return LeaseStore(store.engine, owner, TTL, now=clock.sql)


async def lease_row(store: Store, world_id: int) -> tuple[str | None, int]:
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT lease_owner, lease_epoch FROM world_states WHERE world_id = :w"), {"w": world_id}
            )
        ).one()
    return row[0], int(row[1])


async def test_claim_is_exclusive_until_expiry_and_bumps_the_epoch(pg: Store) -> None:
    clock = DbClock()
    worlds = [(await make_world(pg, name=f"w{i}"))[0] for i in range(3)]
    a, b = lease_store(pg, "a", clock), lease_store(pg, "b", clock)

    got_a = await a.claim(worlds, 2)
    assert [(x.world_id, x.epoch) for x in got_a] == [(worlds[0], 1), (worlds[1], 1)]
    got_b = await b.claim(worlds, 5)
    assert [(x.world_id, x.epoch) for x in got_b] == [(worlds[2], 1)]  # A's are not free

    clock.advance(TTL / 2)
    assert (await a.renew(got_a)).renewed == {worlds[0], worlds[1]}
    clock.advance(TTL * 0.9)  # A renewed: still inside its TTL, B's first claim expired
    assert (await b.renew(got_b)).renewed == {worlds[2]}  # renewing an expired, unclaimed lease is fine
    assert await b.claim(worlds, 5) == []

    clock.advance(TTL)  # A stopped renewing
    taken = await b.claim(worlds[:2], 5)
    assert [(x.world_id, x.epoch) for x in taken] == [(worlds[0], 2), (worlds[1], 2)]
    assert await a.renew(got_a) == RenewResult(set(), {worlds[0], worlds[1]})  # lost: epoch moved on
    assert await a.release(got_a) == set()  # and A cannot release B's leases
    assert await lease_row(pg, worlds[0]) == ("b", 2)

    assert await b.release(taken) == {worlds[0], worlds[1]}
    again = await a.claim(worlds[:2], 5)  # released: claimable at once, no TTL wait
    assert [(x.world_id, x.epoch) for x in again] == [(worlds[0], 3), (worlds[1], 3)]


async def test_heartbeats_count_live_instances_from_the_database_clock(pg: Store) -> None:
    clock = DbClock()
    a, b = lease_store(pg, "a", clock), lease_store(pg, "b", clock)
    assert await a.heartbeat() == 1
    assert await b.heartbeat() == 2
    clock.advance(TTL + 1)  # A died
    assert await b.heartbeat() == 1
    assert {r["instance_id"]: r["live"] for r in await live_instances(pg, clock.sql)} == {"a": False, "b": True}
    await b.leave()
    assert [r["instance_id"] for r in await live_instances(pg, clock.sql)] == ["a"]


async def test_fenced_tick_after_takeover_rolls_back_and_writes_nothing(pg: Store) -> None:
    clock = DbClock()
    world_id, _ = await make_world(pg, npcs_per_tier={Tier.DETAILED: 3})
    a, b = lease_store(pg, "a", clock), lease_store(pg, "b", clock)
    (lease_a,) = await a.claim([world_id], 1)
    sched_a = WorldScheduler(pg)
    await sched_a.register_world(world_id, lease=lease_a)
    await sched_a.tick_world(world_id, 1.0)  # ours: commits
    assert await world_state(pg, world_id) == (pytest.approx(60.0), 1)

    clock.advance(TTL + 1)
    (lease_b,) = await b.claim([world_id], 1)
    assert lease_b.epoch == lease_a.epoch + 1
    npcs_before = await npc_rows(pg, world_id)
    with pytest.raises(LeaseLostError):
        await sched_a.tick_world(world_id, 1.0)
    assert await world_state(pg, world_id) == (pytest.approx(60.0), 1)
    assert await npc_rows(pg, world_id) == npcs_before
    assert sched_a.get_context(world_id).ticks_processed == 1  # context untouched too

    sched_b = WorldScheduler(pg)
    await sched_b.register_world(world_id, lease=lease_b)
    await sched_b.tick_world(world_id, 1.0)
    assert await world_state(pg, world_id) == (pytest.approx(120.0), 2)


async def test_advance_world_state_is_fenced_on_owner_and_epoch(pg: Store) -> None:
    """The final UPDATE re-checks the lease even without the leading row lock."""
    world_id, _ = await make_world(pg)
    clock = DbClock()
    (lease,) = await lease_store(pg, "a", clock).claim([world_id], 1)
    stale = Lease(world_id, "a", lease.epoch - 1)
    with pytest.raises(Exception, match="with lease"):
        async with pg.transaction() as conn:
            await pg.advance_world_state(conn, world_id, world_time=1.0, expected_ticks=0, fence=stale.fence)
    async with pg.transaction() as conn:
        await pg.advance_world_state(conn, world_id, world_time=1.0, expected_ticks=0, fence=lease.fence)
    assert await world_state(pg, world_id) == (1.0, 1)


async def test_grouped_clock_moves_are_fenced_each_on_its_own_lease(pg: Store) -> None:
    """One statement moves several worlds' clocks; a world whose fence fails is named and moves nothing."""
    ids = [(await make_world(pg, name=f"w{i}"))[0] for i in range(3)]
    clock = DbClock()
    leases = {x.world_id: x for x in await lease_store(pg, "a", clock).claim(ids, 3)}
    big = 2**40  # tick counters and epochs are bigint
    async with pg.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE world_states SET ticks = :t WHERE world_id = :w"), {"t": big, "w": ids[2]})
        await conn.execute(
            sa.text("UPDATE world_states SET lease_epoch = :e WHERE world_id = :w"), {"e": big, "w": ids[0]}
        )
    at = datetime(2026, 1, 1, tzinfo=UTC)
    advances = [
        WorldAdvance(ids[0], 10.0, 0, at, Lease(ids[0], "a", big).fence),
        WorldAdvance(ids[1], 20.0, 0, at, Lease(ids[1], "a", leases[ids[1]].epoch + 1).fence),
        WorldAdvance(ids[2], 30.0, big, at, None),
    ]
    with pytest.raises(StaleWorldStateError, match=rf"worlds \[{ids[1]}\]"):
        async with pg.transaction() as conn:
            await pg.advance_world_states(conn, advances)
    async with pg.transaction() as conn:
        await pg.advance_world_states(conn, [advances[0], advances[2]])
    assert [await world_state(pg, w) for w in ids] == [(10.0, 1), (0.0, 0), (30.0, big + 1)]


def lease_runner(pg: Store, owner: str, db_clock: DbClock, clock: VirtualClock) -> SchedulerLoopRunner:
    keeper = LeaseKeeper(lease_store(pg, owner, db_clock), clock)
    return SchedulerLoopRunner(WorldScheduler(pg), pg, clock=clock, leases=keeper)


async def test_runner_drops_a_world_at_once_when_its_fence_fails(pg: Store) -> None:
    db_clock = DbClock()
    world_id, _ = await make_world(pg, simulation={"alwaysOn": True})
    clock_a, clock_b = VirtualClock(), VirtualClock()
    runner_a = lease_runner(pg, "a", db_clock, clock_a)
    runner_b = lease_runner(pg, "b", db_clock, clock_b)
    await runner_a.discover()
    assert runner_a.world_ids == [world_id]
    await runner_a.run_until(1.0)
    assert await world_state(pg, world_id) == (pytest.approx(60.0), 1)

    db_clock.advance(TTL + 1)  # A's lease and heartbeat expire in the database
    await runner_b.discover()  # B sees one live instance (itself) and takes the world
    assert runner_b.world_ids == [world_id]
    assert await lease_row(pg, world_id) == ("b", 2)

    await runner_a.run_until(2.0)  # A's local lease is still "valid": the DB fence stops it
    assert runner_a.world_ids == []
    stats_a = runner_a.get_stats()["leases"]
    assert stats_a["lease_lost"] == 1 and stats_a["leases_held"] == 0
    assert runner_a.ticks_failed == 0
    assert await world_state(pg, world_id) == (pytest.approx(60.0), 1)

    await runner_b.run_until(1.0)
    assert await world_state(pg, world_id) == (pytest.approx(120.0), 2)
    assert runner_b.get_stats()["worlds"][world_id]["lease_owner"] == "b"


async def test_a_forced_tick_after_the_lease_was_lost_drops_the_world_as_a_regular_tick_does(pg: Store) -> None:
    # The admin API's forced tick found the fence failing and answered 500; it is a world this
    # daemon no longer runs (404), dropped at once, and not a failed tick.
    db_clock = DbClock()
    world_id, _ = await make_world(pg, simulation={"alwaysOn": True})
    runner_a = lease_runner(pg, "a", db_clock, VirtualClock())
    runner_b = lease_runner(pg, "b", db_clock, VirtualClock())
    await runner_a.discover()
    await runner_a.run_until(1.0)
    db_clock.advance(TTL + 1)
    await runner_b.discover()
    with pytest.raises(WorldNotRegisteredError):
        await runner_a.force_tick(world_id, 1.0)
    assert runner_a.world_ids == []
    assert runner_a.get_stats()["leases"]["lease_lost"] == 1 and runner_a.ticks_failed == 0
    assert await world_state(pg, world_id) == (pytest.approx(60.0), 1)


async def test_after_a_freeze_only_the_fence_decides_which_worlds_still_tick(pg: Store) -> None:
    db_clock = DbClock()
    kept, _ = await make_world(pg, name="kept", simulation={"alwaysOn": True})
    taken, _ = await make_world(pg, name="taken", simulation={"alwaysOn": True})
    clock = VirtualClock()
    runner_a = lease_runner(pg, "a", db_clock, clock)
    await runner_a.discover()
    assert runner_a.world_ids == [kept, taken]

    # A's loop freezes for 3 TTLs; meanwhile B takes one world (by id, as a peer would).
    clock.set(3 * TTL)
    db_clock.advance(3 * TTL)
    b = lease_store(pg, "b", db_clock)
    assert [x.world_id for x in await b.claim([taken], 1)] == [taken]
    await runner_a.run_once()  # both due, both locally overdue: the fenced ticks decide
    assert runner_a.world_ids == [kept]
    stats = runner_a.get_stats()["leases"]
    assert stats["lease_lost"] == 1 and stats["renewals_overdue"] == 2
    assert runner_a.leases is not None and runner_a.leases.is_valid(kept)  # the tick renewed it
    assert (await world_state(pg, kept))[1] == 1  # nobody took it: renewed and ticked
    assert await world_state(pg, taken) == (0.0, 0)  # nothing written for the lost world


async def test_a_paused_world_keeps_its_lease(pg: Store) -> None:
    # A paused world's ticks write nothing, so they must not count as renewals:
    # the renewal task renews its lease, and no peer can take it.
    db_clock = DbClock()
    world_id, _ = await make_world(pg, simulation={"alwaysOn": True, "pauseSimulation": True})
    clock = VirtualClock()
    runner_a = lease_runner(pg, "a", db_clock, clock)
    await runner_a.discover()
    assert runner_a.world_ids == [world_id]
    keeper = runner_a.leases
    assert keeper is not None
    for _ in range(3):  # the renewal task's rounds over one TTL, paused ticks in between
        await runner_a.run_until(clock.now() + keeper.renew_interval_seconds)
        db_clock.advance(keeper.renew_interval_seconds)
        assert await keeper.renew() == []
    db_clock.advance(1.0)  # past the expiry of the claim itself
    assert await lease_store(pg, "b", db_clock).claim([world_id], 1) == []
    assert await lease_row(pg, world_id) == ("a", 1)


async def test_fair_share_sheds_surplus_and_the_newcomer_claims_it(pg: Store) -> None:
    db_clock = DbClock()
    worlds = [(await make_world(pg, name=f"w{i}", simulation={"alwaysOn": True}))[0] for i in range(5)]
    clock = VirtualClock()
    runner_a = lease_runner(pg, "a", db_clock, clock)
    runner_b = lease_runner(pg, "b", db_clock, clock)
    await runner_a.discover()
    assert runner_a.world_ids == worlds  # alone: everything
    await runner_b.discover()  # two live instances now, but nothing is free yet
    assert runner_b.world_ids == []
    await runner_a.discover()  # share = ceil(5/2) = 3: shed 2
    assert len(runner_a.world_ids) == 3
    await runner_b.discover()
    assert len(runner_b.world_ids) == 2
    assert sorted(runner_a.world_ids + runner_b.world_ids) == worlds

    await runner_b.shutdown()  # clean stop: releases leases and leaves at once
    await runner_a.discover()
    assert runner_a.world_ids == worlds
    assert runner_a.get_stats()["leases"]["live_instances"] == 1


def test_second_daemon_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}"
    fd = lock_sqlite_database(url)
    assert fd is not None
    try:
        with pytest.raises(StartupError, match="already running on the SQLite database") as err:
            lock_sqlite_database(url)
        assert err.value.exit_code == EXIT_ALREADY_RUNNING
    finally:
        os.close(fd)
    second = lock_sqlite_database(url)  # released with the first holder
    assert second is not None
    os.close(second)


@pytest.mark.parametrize("alias", ["symlink", "dot-dot", "relative"])
def test_the_sqlite_lock_is_keyed_on_the_real_file(tmp_path: Path, alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "data" / "scheduler.db"
    real.parent.mkdir()
    real.touch()
    if alias == "symlink":
        (tmp_path / "link.db").symlink_to(real)
        other = tmp_path / "link.db"
    elif alias == "dot-dot":
        other = tmp_path / "data" / ".." / "data" / "scheduler.db"
    else:
        monkeypatch.chdir(tmp_path)
        other = Path("data/scheduler.db")
    fd = lock_sqlite_database(f"sqlite+aiosqlite:///{real}")
    assert fd is not None
    try:
        with pytest.raises(StartupError, match="already running") as err:
            lock_sqlite_database(f"sqlite+aiosqlite:///{other}")
        assert str(real) in str(err.value)
    finally:
        os.close(fd)


async def test_renewal_skips_a_row_our_tick_holds_and_claims_skip_it_too(pg: Store) -> None:
    clock = DbClock()
    busy, _ = await make_world(pg, name="busy")
    idle, _ = await make_world(pg, name="idle")
    a, b = lease_store(pg, "a", clock), lease_store(pg, "b", clock)
    leases = await a.claim([busy, idle], 2)
    clock.advance(TTL + 1)  # both expired: claimable by b unless locked
    async with pg.engine.connect() as conn:
        trans = await conn.begin()
        await pg.fence_tick(conn, leases[0])  # a's tick of `busy` holds its row
        result = await a.renew(leases)
        assert result == RenewResult({idle}, set())  # neither renewed nor lost: decided next time
        assert [x.world_id for x in await b.claim([busy, idle], 2)] == []  # idle renewed, busy locked
        await trans.commit()
    assert (await a.renew(leases)).renewed == {busy, idle}


async def test_current_owner_names_the_unexpired_lease_by_id_or_external_id(pg: Store) -> None:
    clock = DbClock()
    world, _ = await make_world(pg, name="owned")
    async with pg.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE worlds SET external_id = 'harbor' WHERE id = :w"), {"w": world})
    a = lease_store(pg, "box-w1", clock)
    assert await current_owner(pg.engine, world, now=clock.sql) is None  # free
    leases = await a.claim([world], 1)
    assert await current_owner(pg.engine, world, now=clock.sql) == "box-w1"
    assert await current_owner(pg.engine, "harbor", now=clock.sql) == "box-w1"
    assert await current_owner(pg.engine, "elsewhere", now=clock.sql) is None
    assert await current_owner(pg.engine, world + 1000, now=clock.sql) is None
    clock.advance(TTL + 1)
    assert await current_owner(pg.engine, world, now=clock.sql) is None  # expired
    clock.advance(-(TTL + 1))
    await a.release(leases)
    assert await current_owner(pg.engine, world, now=clock.sql) is None
