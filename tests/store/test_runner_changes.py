"""``SchedulerLoopRunner.apply_changes``: a world's changes reach it before its next tick, not the next poll."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.leases import LeaseStore
from scheduler_daemon.store.repository import Store
from tests.support.helpers import make_world, npc_rows, update_world_simulation, world_state

#: Long enough that only apply_changes (or an explicit discover()) can pick a change up.
NO_POLL = RunnerLimits(discovery_interval_seconds=3600, tier_refresh_max_seconds=3600)


def runner_for(store: Store, clock: VirtualClock, **kwargs: Any) -> SchedulerLoopRunner:
    return SchedulerLoopRunner(WorldScheduler(store), store, clock=clock, limits=NO_POLL, **kwargs)


async def tiers(store: Store, world_id: int) -> dict[int, Tier]:
    return {int(r[0]): Tier(r[1]) for r in await npc_rows(store, world_id)}


async def test_a_session_opened_in_the_database_reaches_the_tiers_before_the_next_tick(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"alwaysOn": True}, session=False)
    scene, *others = await store.add_npcs(world_id, [{"name": f"n{i}", "home": "h"} for i in range(3)])
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.discover()
    assert set((await tiers(store, world_id)).values()) == {Tier.DORMANT}  # nobody online

    await store.add_session(world_id, "player", location="square", scene_npc_ids=[scene])
    await runner.apply_changes([world_id])
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.ticks_processed == 0  # no tick ran: the change was applied on its own
    assert await tiers(store, world_id) == {scene: Tier.DETAILED, **dict.fromkeys(others, Tier.AMBIENT)}
    assert ctx.tier_population[Tier.DETAILED] == 1
    assert runner.changes_applied == 1

    await runner.run_until(1.0)  # the next tick decides the NPC the player is looking at
    decisions = {int(r[0]): int(r[3]) for r in await npc_rows(store, world_id)}
    assert decisions[scene] == 1


async def test_npcs_added_without_a_session_change_are_tiered_at_once(store: Store) -> None:
    """The sessions' fingerprint did not move, so discovery's refresh would skip the world: apply_changes forces it."""
    world_id, _ = await make_world(store, npcs_per_tier={Tier.AMBIENT: 2})  # a player at "square"
    runner = runner_for(store, VirtualClock())
    await runner.discover()
    (newcomer,) = await store.add_npcs(world_id, [{"name": "newcomer", "location": "square"}])
    assert (await tiers(store, world_id))[newcomer] == Tier.DORMANT  # the column's default
    assert await runner.refresh_tiers() == []  # what discovery would do: nothing yet

    await runner.apply_changes([world_id])
    assert (await tiers(store, world_id))[newcomer] == Tier.DETAILED  # at the player's location


async def test_a_new_config_version_applies_and_an_invalid_one_isolates_the_world(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 10})
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.discover()
    await runner.run_until(1.0)
    version = await update_world_simulation(store, world_id, {"timeScale": 100})
    clock.set(1.5)
    await runner.apply_changes([world_id])  # the half second so far accrues at 10
    assert runner.scheduler.get_context(world_id).config_version == version
    await runner.run_until(2.0)
    assert (await world_state(store, world_id))[0] == pytest.approx(10 + 0.5 * 10 + 0.5 * 100)

    await update_world_simulation(store, world_id, {"timeScale": 0})
    await runner.apply_changes([world_id])
    assert runner.world_ids == []
    assert f"world {world_id}" in runner.broken[world_id].error and "timeScale" in runner.broken[world_id].error
    await runner.run_until(5.0)
    assert (await world_state(store, world_id))[1] == 2  # no tick after the bad config


async def test_a_deleted_world_is_dropped_and_unknown_ids_are_ignored(store: Store) -> None:
    kept, _ = await make_world(store, name="kept", npcs_per_tier={Tier.DETAILED: 1})
    gone, _ = await make_world(store, name="gone", npcs_per_tier={Tier.DETAILED: 1})
    runner = runner_for(store, VirtualClock())
    await runner.discover()
    await runner.run_until(1.0)
    async with store.transaction() as conn:
        await conn.execute(sa.text("DELETE FROM worlds WHERE id = :w"), {"w": gone})

    await runner.apply_changes([gone, 987654])
    assert runner.world_ids == [kept]
    assert runner.broken == {}
    await runner.run_until(3.0)
    assert runner.ticks_failed == 0
    assert (await world_state(store, kept))[1] == 3


async def test_without_a_running_loop_unregistered_worlds_are_left_to_the_caller(store: Store) -> None:
    world_id, _ = await make_world(store, session=False)
    runner = runner_for(store, VirtualClock())
    await store.add_session(world_id, "player")
    await runner.apply_changes([world_id])
    assert runner.world_ids == []  # run_once-style use: the caller registers (or calls discover())
    await runner.discover()
    assert runner.world_ids == [world_id]


async def _until(condition: Any, what: str) -> None:
    """Bounded wait for the loop (the virtual clock stands still; only the loop's own work moves things)."""
    deadline = asyncio.get_running_loop().time() + 30
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_running_loop_registers_and_drops_worlds_at_once(store: Store) -> None:
    """Whether a world runs stays discovery's call; apply_changes makes the loop discover now, not an hour later."""
    world_id, _ = await make_world(store, session=False)
    clock = VirtualClock()
    runner = runner_for(store, clock)
    task = asyncio.create_task(runner.start())
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        assert runner.world_ids == []
        session = await store.add_session(world_id, "player")
        await runner.apply_changes([world_id])

        async def registered() -> bool:
            return runner.world_ids == [world_id]

        await _until(registered, "the world with a new session was not registered")

        async with store.transaction() as conn:
            await conn.execute(sa.text("UPDATE sessions SET active = false WHERE id = :s"), {"s": session})
        await runner.apply_changes([world_id])

        async def dropped() -> bool:
            return runner.world_ids == []

        await _until(dropped, "the world without sessions was not dropped")
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=30)


@pytest.mark.postgres
async def test_with_leases_only_the_owner_acts(pg_store: Store) -> None:
    store = pg_store
    owned, _ = await make_world(store, name="owned", simulation={"alwaysOn": True})
    clock_a, clock_b = VirtualClock(), VirtualClock()
    runner_a = runner_for(store, clock_a, leases=LeaseKeeper(LeaseStore(store.engine, "a", 30.0), clock_a))
    runner_b = runner_for(store, clock_b, leases=LeaseKeeper(LeaseStore(store.engine, "b", 30.0), clock_b))
    await runner_a.discover()
    assert runner_a.world_ids == [owned]
    task = asyncio.create_task(runner_b.start())
    try:
        await asyncio.wait_for(runner_b.discovered.wait(), timeout=30)
        assert runner_b.world_ids == []
        planned = runner_b._next_discovery
        await store.add_session(owned, "player", location="square")
        await runner_b.apply_changes([owned])
        assert runner_b._next_discovery == planned  # A's world: B neither acts nor discovers
        assert runner_b.changes_applied == 0

        free, _ = await make_world(store, name="free", session=False)
        await store.add_session(free, "player")
        await runner_b.apply_changes([free])  # nobody owns it yet: B's discovery claims it

        async def claimed() -> bool:
            return runner_b.world_ids == [free]

        await _until(claimed, "the unowned world was not claimed")
    finally:
        runner_b.stop()
        await asyncio.wait_for(task, timeout=30)
    await runner_a.apply_changes([owned])
    assert runner_a.changes_applied == 1


@pytest.mark.postgres
async def test_a_daemon_that_lost_the_lease_unawares_writes_no_tiers(pg_store: Store) -> None:
    """A frozen daemon wakes to a change notified meanwhile: the world is another's now, not ours to tier."""
    store = pg_store
    world_id, _ = await make_world(store, simulation={"alwaysOn": True})  # a player at "square"
    clock_a, clock_b = VirtualClock(), VirtualClock()
    runner_a = runner_for(store, clock_a, leases=LeaseKeeper(LeaseStore(store.engine, "a", 30.0), clock_a))
    runner_b = runner_for(store, clock_b, leases=LeaseKeeper(LeaseStore(store.engine, "b", 30.0), clock_b))
    await runner_a.discover()
    assert runner_a.world_ids == [world_id]

    # A stands still for longer than the TTL (SIGSTOP, a VM pause); its lease runs out and B takes the world.
    clock_a.set(100.0)
    async with store.transaction() as conn:
        await conn.execute(
            sa.text("UPDATE world_states SET lease_expires_at = now() - interval '1 second' WHERE world_id = :w"),
            {"w": world_id},
        )
    await runner_b.discover()
    assert runner_b.world_ids == [world_id]
    (newcomer,) = await store.add_npcs(world_id, [{"name": "newcomer", "location": "square"}])
    await update_world_simulation(store, world_id, {"tiers": {"detailed": {"maxNpcs": 5}}})  # reassigns tiers too

    with structlog.testing.capture_logs() as logs:
        await runner_a.apply_changes([world_id])  # A, awake again, before its renewal noticed the loss
        assert (await tiers(store, world_id))[newcomer] == Tier.DORMANT  # the column's default: A wrote nothing
        assert runner_a.changes_applied == 0
        await runner_a.discover()
    assert (await tiers(store, world_id))[newcomer] == Tier.DORMANT
    assert runner_a.broken == {}
    assert [e for e in logs if e["log_level"] == "error"] == []  # not a failure: the world is B's

    await runner_b.apply_changes([world_id])
    assert (await tiers(store, world_id))[newcomer] == Tier.DETAILED
    await runner_a.run_until(101.0)  # A's next tick: its fence drops the world
    assert runner_a.world_ids == []


@pytest.mark.parametrize("leased", [False, True])
async def test_a_world_deleted_by_another_writer_is_dropped_by_its_next_tick_without_an_error(
    store: Store, leased: bool
) -> None:
    # A game deleting the world with SQL, or through another daemon's API: this runner learns it
    # from its next tick, whose fence finds no state row. Before, that logged errors ("tick
    # refused", "world_resync_failed" with a traceback; with leases a foreign-key violation from
    # recreating the state row) and kept the deleted world registered, backing off.
    if leased and store.dialect != "postgresql":
        pytest.skip("leases are PostgreSQL-only")
    kept, _ = await make_world(store, name="kept", npcs_per_tier={Tier.DETAILED: 1})
    gone, _ = await make_world(store, name="gone", npcs_per_tier={Tier.DETAILED: 2})
    clock = VirtualClock()
    leases = LeaseKeeper(LeaseStore(store.engine, "a", 30.0), clock) if leased else None
    runner = runner_for(store, clock, leases=leases)
    await runner.discover()
    await runner.run_until(1.0)
    async with store.transaction() as conn:
        await conn.execute(sa.text("DELETE FROM worlds WHERE id = :w"), {"w": gone})
    with structlog.testing.capture_logs() as logs:
        await runner.run_until(2.0)
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert runner.world_ids == [kept]
    async with store.connect() as conn:
        states = (await conn.execute(sa.text("SELECT world_id FROM world_states ORDER BY 1"))).scalars().all()
    assert states == [kept]  # the deleted world's state row is not recreated
    await runner.run_until(3.0)
    assert (await world_state(store, kept))[1] == 3
