"""Worlds registered by hand on the scheduler are run by ``SchedulerLoopRunner`` (both backends).

The original deployment guide's patterns: ``scheduler.register_world(w)`` for
each active world, then ``SchedulerLoopRunner(scheduler).run_once()`` (a cron
job making a new scheduler and runner every call) or ``runner.start()``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from scheduler_daemon import SchedulerLoopRunner, Store, VirtualClock, WorldScheduler
from scheduler_daemon.runner import RunnerLimits
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.models import world_states, worlds
from tests.support.helpers import make_world, update_world_simulation, world_state


async def stamp(store: Store, world_id: int) -> datetime:
    """The world's ``last_advanced_at`` (aware, UTC)."""
    async with store.connect() as conn:
        at = (
            await conn.execute(sa.select(world_states.c.last_advanced_at).where(world_states.c.world_id == world_id))
        ).scalar_one()
    assert isinstance(at, datetime)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def set_stamp(store: Store, world_id: int, at: datetime) -> None:
    async with store.transaction() as conn:
        await conn.execute(
            sa.update(world_states).where(world_states.c.world_id == world_id).values(last_advanced_at=at)
        )


async def cron_call(store: Store, clock: VirtualClock | None = None) -> dict[str, int]:
    """Option 1 of the guide: a new scheduler and runner per call, every active world registered by hand."""
    scheduler = WorldScheduler(store)
    for world_id in await store.active_world_ids():
        await scheduler.register_world(world_id)
    return await SchedulerLoopRunner(scheduler, clock=clock).run_once()


async def test_run_once_ticks_the_worlds_registered_on_the_scheduler(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    scheduler = WorldScheduler(store)
    await scheduler.register_world(world_id)
    # A virtual clock: no real time passes between adoption and the tick.
    runner = SchedulerLoopRunner(scheduler, clock=VirtualClock())
    assert await runner.run_once() == {"ticked": 1, "failed": 0}
    assert await world_state(store, world_id) == (60.0, 1)  # a world never ticked: one interval
    stats = scheduler.get_context(world_id).get_stats()
    assert stats["current_world_time"] == 60.0 and stats["npcs_simulated_last_tick"] == 2
    assert stats["last_tick_duration_ms"] > 0
    assert await runner.run_once() == {"ticked": 0, "failed": 0}  # same runner: next due in an interval


async def test_run_once_ticks_an_adopted_world_whatever_the_clock_reads(store: Store) -> None:
    # (now - interval) + interval rounds above now for some readings: the world is due all the same.
    interval, now = 0.7, 2.9742829841872775
    assert (now - interval) + interval > now
    world_id, _ = await make_world(store, simulation={"timeScale": 60, "tickIntervalSeconds": interval})
    scheduler = WorldScheduler(store)
    await scheduler.register_world(world_id)
    clock = VirtualClock()
    clock.set(now)
    assert await SchedulerLoopRunner(scheduler, clock=clock).run_once() == {"ticked": 1, "failed": 0}
    assert await world_state(store, world_id) == (pytest.approx(60 * interval), 1)


async def test_a_new_runner_per_call_never_counts_real_time_twice(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    assert await cron_call(store, VirtualClock()) == {"ticked": 1, "failed": 0}
    first, stamped = await world_state(store, world_id), await stamp(store, world_id)
    assert first == (60.0, 1)
    for n in range(2, 6):
        # Calls back to back, much faster than the 1 s interval: each covers
        # only the real time since the previous commit, never a whole interval.
        before = await world_state(store, world_id)
        assert await cron_call(store) == {"ticked": 1, "failed": 0}
        now = datetime.now(UTC)
        after = await world_state(store, world_id)
        assert after[1] == n and after[0] >= before[0]  # never backwards
        assert after[0] - first[0] <= 60 * (now - stamped).total_seconds()


async def test_the_first_tick_covers_at_most_max_catch_up_and_nothing_for_a_stamp_ahead(store: Store) -> None:
    world_id, _ = await make_world(
        store, simulation={"timeScale": 60, "tickIntervalSeconds": 2, "maxCatchUpSeconds": 10}
    )
    await cron_call(store, VirtualClock())
    assert await world_state(store, world_id) == (120.0, 1)  # never ticked: one interval
    # Nobody ran the world for an hour: it resumes with maxCatchUpSeconds, like a late tick, not an hour.
    await set_stamp(store, world_id, datetime.now(UTC) - timedelta(hours=1))
    await cron_call(store, VirtualClock())
    assert await world_state(store, world_id) == (720.0, 2)
    # The stamp is ahead of our clock (written by a host whose clock is ahead): nothing, never backwards.
    await set_stamp(store, world_id, datetime.now(UTC) + timedelta(hours=1))
    await cron_call(store, VirtualClock())
    assert await world_state(store, world_id) == (720.0, 3)


async def test_a_paused_world_is_adopted_and_stays_frozen(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60, "pauseSimulation": True})
    assert await cron_call(store, VirtualClock()) == {"ticked": 1, "failed": 0}
    assert await world_state(store, world_id) == (0.0, 0)  # nothing written


async def test_discovery_keeps_worlds_registered_by_hand_and_follows_their_config(store: Store) -> None:
    listed, _ = await make_world(store, name="listed", simulation={"timeScale": 60})  # has a session
    unlisted, _ = await make_world(store, name="unlisted", simulation={"timeScale": 60}, session=False)
    assert await store.active_world_ids() == [listed]
    scheduler = WorldScheduler(store)
    for world_id in (listed, unlisted):
        await scheduler.register_world(world_id)
    clock = VirtualClock()
    runner = SchedulerLoopRunner(scheduler, clock=clock)
    await runner.discover()
    assert runner.world_ids == [listed, unlisted]
    await runner.run_until(3.0)  # adopted worlds are due at once: ticks at 0, 1, 2, 3
    assert await world_state(store, listed) == (pytest.approx(240.0), 4)
    assert await world_state(store, unlisted) == (pytest.approx(240.0), 4)

    # A config change of the world discovery does not list is picked up too.
    await update_world_simulation(store, unlisted, {"timeScale": 120})
    await runner.discover()
    assert scheduler.get_context(unlisted).config.time_scale == 120
    await runner.run_until(4.0)
    assert (await world_state(store, unlisted))[0] == pytest.approx(360.0)

    # Unregistered by hand: no longer run, and not a failure.
    await scheduler.unregister_world(unlisted)
    await runner.run_until(5.0)
    assert runner.world_ids == [listed] and runner.ticks_failed == 0
    assert (await world_state(store, unlisted))[1] == 5

    # Registered again while the runner runs: the next discovery pass adopts it.
    await scheduler.register_world(unlisted)
    await runner.discover()
    assert runner.world_ids == [listed, unlisted]
    # Deleted from the database: dropped.
    async with store.transaction() as conn:
        await conn.execute(sa.delete(world_states).where(world_states.c.world_id == unlisted))
        await conn.execute(sa.delete(worlds).where(worlds.c.id == unlisted))
    await runner.discover()
    assert runner.world_ids == [listed] and not scheduler.is_registered(unlisted)


async def test_start_runs_worlds_registered_by_hand(store: Store) -> None:
    fast = {"timeScale": 60, "tickIntervalSeconds": 0.05, "maxCatchUpSeconds": 1}
    listed, _ = await make_world(store, name="listed", simulation=fast)
    unlisted, _ = await make_world(store, name="unlisted", simulation=fast, session=False)
    scheduler = WorldScheduler(store)
    for world_id in (listed, unlisted):
        await scheduler.register_world(world_id)
    runner = SchedulerLoopRunner(scheduler, limits=RunnerLimits(discovery_interval_seconds=0.05))
    task = asyncio.create_task(runner.start())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Bounded polling: both keep ticking across several discovery passes.
        while True:
            ticks = [(await world_state(store, w))[1] for w in (listed, unlisted)]
            if min(ticks) >= 10:
                break
            assert loop.time() < deadline, f"worlds registered by hand did not tick: {ticks}"
            assert not task.done()
            await asyncio.sleep(0.05)
        assert runner.world_ids == [listed, unlisted] and runner.ticks_failed == 0
    finally:
        runner.stop()
        await task
    await runner.shutdown()
    assert not scheduler.get_all_contexts()


async def test_stop_before_start_is_not_lost(store: Store) -> None:
    # A signal handler may call stop() before the loop task has begun.
    runner = SchedulerLoopRunner(WorldScheduler(store))
    task = asyncio.create_task(runner.start())
    runner.stop()
    await asyncio.wait_for(task, timeout=10)
    # And the loop can run again afterwards.
    progress = runner.progress
    again = asyncio.create_task(runner.start())
    async with asyncio.timeout(10):
        while runner.progress == progress:  # the loop runs
            await asyncio.sleep(0.01)
    assert not again.done()
    runner.stop()
    await asyncio.wait_for(again, timeout=10)


async def test_with_leases_only_worlds_whose_lease_is_held_tick(pg_store: Store) -> None:
    from scheduler_daemon.leasing import LeaseKeeper
    from tests.store.test_leases import DbClock, lease_store

    listed, _ = await make_world(pg_store, name="listed")
    unlisted, _ = await make_world(pg_store, name="unlisted", session=False)
    scheduler = WorldScheduler(pg_store)
    for world_id in (listed, unlisted):
        await scheduler.register_world(world_id)  # by hand, without a lease
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        scheduler, clock=clock, leases=LeaseKeeper(lease_store(pg_store, "a", DbClock()), clock)
    )
    assert await runner.run_once() == {"ticked": 0, "failed": 0}  # never unfenced
    await runner.discover()  # claims the listed world's lease and registers it, fenced
    assert runner.world_ids == [listed]
    await runner.run_until(1.0)
    assert (await world_state(pg_store, listed))[1] == 1
    assert await world_state(pg_store, unlisted) == (0.0, 0)
    assert scheduler.get_stats()["worlds"][listed]["lease_owner"] == "a"


async def test_the_guides_programmatic_calls(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    assert world_id == 1
    scheduler = WorldScheduler(store)
    await scheduler.register_world(world_id=1)
    result = await scheduler.tick_world(world_id=1, delta_real_seconds=1.0)
    assert result.world_time_after == 60.0 and result.npcs_simulated == 2
    stats = scheduler.get_context(world_id=1).get_stats()
    assert stats["current_world_time"] == 60.0 and stats["npcs_simulated_last_tick"] == 2
    assert stats["last_tick_duration_ms"] > 0
    await scheduler.unregister_world(world_id=1)
    assert not scheduler.is_registered(1)
