"""SchedulerLoopRunner on a virtual clock against real databases: rates, skips, isolation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import scheduler_daemon.runner.state as runner_state
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.behavior import BehaviorContent, decide
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier
from scheduler_daemon.store.repository import Store
from tests.support.helpers import (
    drop_trigger,
    install_failing_trigger,
    make_world,
    set_session_active,
    update_world_simulation,
    world_state,
)


def runner_for(store: Store, clock: VirtualClock, **limits: Any) -> SchedulerLoopRunner:
    return SchedulerLoopRunner(WorldScheduler(store), store, clock=clock, limits=RunnerLimits(**limits))


async def test_worlds_tick_at_their_own_rates(store: Store) -> None:
    fast, _ = await make_world(store, name="fast", simulation={"tickIntervalSeconds": 0.5, "timeScale": 10})
    slow, _ = await make_world(store, name="slow", simulation={"tickIntervalSeconds": 2.0, "timeScale": 10})
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.add_world(fast)
    await runner.add_world(slow)
    await runner.run_until(10.0)
    assert await world_state(store, fast) == (pytest.approx(100.0), 20)
    assert await world_state(store, slow) == (pytest.approx(100.0), 5)
    stats = runner.get_stats()
    assert stats["worlds"][fast]["ticks_skipped"] == 0 and stats["worlds"][slow]["ticks_skipped"] == 0


async def test_stalled_loop_skips_missed_slots_and_covers_elapsed_time(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"tickIntervalSeconds": 1.0, "timeScale": 60})
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.add_world(world_id)
    await runner.run_until(2.0)  # ticks at 1 and 2
    clock.set(7.5)  # the loop was blocked for 5.5 s
    await runner.run_once()  # one tick, not a burst of five
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.ticks_processed == 3
    assert ctx.ticks_skipped == 4  # slots 3, 4, 5, 6 passed without a tick; 7 is served late
    assert ctx.current_world_time == pytest.approx(7.5 * 60)
    await runner.run_until(10.0)  # back on the grid: 8, 9, 10
    assert await world_state(store, world_id) == (pytest.approx(600.0), 6)


async def test_tick_overrunning_its_interval_skips_slots(store: Store) -> None:
    clock = VirtualClock()

    def slow_decide(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        clock.advance(2.5)  # this decision "takes" 2.5 s of real time
        return decide(npc, content, world_time, interval)

    world_id, _ = await make_world(
        store, simulation={"timeScale": 1, "maxNpcTicksPerStep": 1}, npcs_per_tier={Tier.DETAILED: 1}
    )
    runner = SchedulerLoopRunner(WorldScheduler(store, decide_fn=slow_decide), store, clock=clock)
    await runner.add_world(world_id)
    await runner.run_until(1.0)  # tick at 1.0 runs until 3.5
    assert clock.now() == pytest.approx(3.5)
    await runner.run_until(3.5)  # slot 3 is served late at 3.5, slot 2 was missed
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.ticks_skipped >= 1
    # World time tracks real time: the second tick started at 3.5.
    assert ctx.current_world_time == pytest.approx(3.5)


async def test_failing_world_is_isolated_backs_off_and_recovers(store: Store) -> None:
    good_a, _ = await make_world(store, name="a", simulation={"timeScale": 1}, npcs_per_tier={Tier.DETAILED: 3})
    bad, _ = await make_world(store, name="bad", simulation={"timeScale": 1}, npcs_per_tier={Tier.DETAILED: 3})
    good_b, _ = await make_world(store, name="b", simulation={"timeScale": 1}, npcs_per_tier={Tier.DETAILED: 3})
    clock = VirtualClock()
    runner = runner_for(store, clock, backoff_base_seconds=1.0, backoff_max_seconds=8.0)
    for w in (good_a, bad, good_b):
        await runner.add_world(w)
    await install_failing_trigger(store, "npcs", bad)
    try:
        await runner.run_until(30.0)
        # The others kept their rate exactly.
        assert await world_state(store, good_a) == (pytest.approx(30.0), 30)
        assert await world_state(store, good_b) == (pytest.approx(30.0), 30)
        # The bad world committed nothing and was retried with backoff, not every second.
        assert await world_state(store, bad) == (0.0, 0)
        ctx = runner.scheduler.get_context(bad)
        assert ctx.state == "failing" and "injected fault" in (ctx.last_error or "")
        assert 4 <= ctx.ticks_failed <= 8  # 1, 2, 4, 8, 8, ... s apart
    finally:
        await drop_trigger(store, "npcs")
    await runner.run_until(45.0)
    ctx = runner.scheduler.get_context(bad)
    assert ctx.state == "running"
    world_time, ticks = await world_state(store, bad)
    assert ticks > 0
    assert world_time <= 45.0  # never more than real time, catch-up capped at 60 s


async def test_discovery_registers_unregisters_and_applies_config(store: Store) -> None:
    a, _ = await make_world(store, name="a", simulation={"timeScale": 10})
    b, _ = await make_world(store, name="b", session=False)
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.discover()
    assert runner.world_ids == [a]

    session = await store.add_session(b, "late-user")
    await runner.discover()
    assert runner.world_ids == [a, b]

    await runner.run_until(1.0)
    version = await update_world_simulation(store, a, {"timeScale": 100})
    clock.set(1.5)
    await runner.discover()  # picks up config_version; the half second so far accrues at 10
    assert runner.scheduler.get_context(a).config_version == version
    await runner.run_until(2.0)
    assert (await world_state(store, a))[0] == pytest.approx(10 + 0.5 * 10 + 0.5 * 100)

    await set_session_active(store, session, False)
    await runner.discover()
    assert runner.world_ids == [a]


async def test_invalid_config_isolates_only_that_world(store: Store) -> None:
    good, _ = await make_world(store, name="good")
    bad, _ = await make_world(store, name="bad", simulation={"tickIntervalSeconds": -1})
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.discover()
    assert runner.world_ids == [good]
    assert bad in runner.broken
    assert f"world {bad}" in runner.broken[bad].error and "tickIntervalSeconds" in runner.broken[bad].error
    # Fixing the config (new version) brings it back on the next discovery.
    await update_world_simulation(store, bad, {"tickIntervalSeconds": 1})
    await runner.discover()
    assert runner.world_ids == [good, bad] and bad not in runner.broken


async def test_config_becoming_invalid_isolates_a_running_world(store: Store) -> None:
    w, _ = await make_world(store)
    runner = runner_for(store, VirtualClock())
    await runner.discover()
    await update_world_simulation(store, w, {"timeScale": 0})
    await runner.discover()
    assert runner.world_ids == [] and "timeScale" in runner.broken[w].error


async def test_interval_change_reanchors_the_grid(store: Store) -> None:
    w, _ = await make_world(store, simulation={"tickIntervalSeconds": 1.0, "timeScale": 1})
    clock = VirtualClock()
    runner = runner_for(store, clock)
    await runner.discover()
    await runner.run_until(3.0)
    await update_world_simulation(store, w, {"tickIntervalSeconds": 0.25, "timeScale": 1})
    await runner.discover()
    await runner.run_until(4.0)
    assert await world_state(store, w) == (pytest.approx(4.0), 3 + 4)


async def test_slots_passed_while_backed_off_are_counted_as_missed(store: Store) -> None:
    """Every slot of a failing world's grid is a committed, a failed or a missed tick: none goes uncounted."""
    world_id, _ = await make_world(store, simulation={"timeScale": 1}, npcs_per_tier={Tier.DETAILED: 1})
    clock = VirtualClock()
    runner = runner_for(store, clock, backoff_base_seconds=1.0, backoff_max_seconds=8.0)
    await runner.add_world(world_id)
    await install_failing_trigger(store, "npcs", world_id)
    try:
        await runner.run_until(30.0)
    finally:
        await drop_trigger(store, "npcs")
    await runner.run_until(45.0)
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.state == "running" and ctx.ticks_failed >= 4
    # 45 one-second slots passed (the grid restarts at the recovering tick, which may shift it by under a slot).
    assert 44 <= ctx.ticks_processed + ctx.ticks_failed + ctx.ticks_skipped <= 45, ctx.get_stats()


async def test_scans_of_every_world_let_due_ticks_run_between_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Discovery and tier refresh scan every registered world through in_chunks:
    # at 10,000 worlds one scan in a single loop step held ticks up by 5-20 ms.
    monkeypatch.setattr(runner_state, "SCAN_CHUNK", 2)
    seen: list[object] = []
    asyncio.get_running_loop().call_soon(seen.append, "tick")  # stands in for a due tick's callback
    async for chunk in runner_state.in_chunks([1, 2, 3, 4, 5]):
        seen.append(chunk)
    assert seen == [[1, 2], "tick", [3, 4], [5]]


async def test_a_runner_made_from_the_scheduler_alone_discovers_its_stores_worlds(store: Store) -> None:
    # The embedding pattern users know: SchedulerLoopRunner(scheduler), then discover() and run.
    world_id, _ = await make_world(store)
    runner = SchedulerLoopRunner(WorldScheduler(store), clock=VirtualClock())
    await runner.discover()
    assert runner.world_ids == [world_id]
    await runner.run_until(3.0)
    assert (await world_state(store, world_id))[1] == 3
