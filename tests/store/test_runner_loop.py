"""The scheduler loop in-process: its resizable tick limit, transient database errors, idle wakes, slot deadlines."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.runner.state import PhaseSlots
from scheduler_daemon.runner.sync import ResizableLimit
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.support.helpers import drop_trigger, make_world, world_state


async def _hold(limit: ResizableLimit, running: list[int], release: asyncio.Event) -> None:
    async with limit:
        running.append(1)
        await release.wait()
        running.pop()


async def test_tick_limit_resizes_while_permits_are_held() -> None:
    limit = ResizableLimit(2)
    running: list[int] = []
    release = asyncio.Event()
    tasks = [asyncio.create_task(_hold(limit, running, release)) for _ in range(6)]
    await asyncio.sleep(0)
    assert len(running) == 2
    limit.resize(4)  # raised: two more start at once
    await asyncio.sleep(0)
    assert len(running) == 4
    limit.resize(1)  # lowered: nobody is cancelled, the next releases pay it back
    release.set()
    await asyncio.gather(*tasks)
    second = asyncio.Event()
    running.clear()
    tasks = [asyncio.create_task(_hold(limit, running, second)) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(running) == 1  # converged to the new limit; permits were not lost either
    second.set()
    await asyncio.gather(*tasks)
    limit.resize(3)
    third = asyncio.Event()
    tasks = [asyncio.create_task(_hold(limit, running, third)) for _ in range(5)]
    await asyncio.sleep(0)
    assert len(running) == 3
    third.set()
    await asyncio.gather(*tasks)


@pytest.mark.postgres
async def test_transient_database_error_retries_the_whole_tick(pg_store: Store) -> None:
    """A serialization failure raised inside the database at commit time: the tick runs again at once.

    PostgreSQL only: SQLite has no serialization failures, and its one transient
    error (busy) is absorbed by busy_timeout before it reaches us.
    """
    store = pg_store
    world_id, _ = await make_world(store, simulation={"timeScale": 10}, npcs_per_tier={Tier.DETAILED: 3})
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.add_world(world_id)
    async with store.transaction() as conn:
        # A sequence is not transactional: the first two ticks fail, later ones pass.
        await conn.execute(text("DROP SEQUENCE IF EXISTS inject_fault_seq"))
        await conn.execute(text("CREATE SEQUENCE inject_fault_seq"))
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION inject_fault_fn() RETURNS trigger AS $$ BEGIN "
                "IF nextval('inject_fault_seq') <= 2 THEN "
                "RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER inject_fault BEFORE UPDATE ON world_states FOR EACH ROW "
                "EXECUTE FUNCTION inject_fault_fn()"
            )
        )
    try:
        await runner.run_until(1.0)
    finally:
        await drop_trigger(store, "world_states")
        async with store.transaction() as conn:
            await conn.execute(text("DROP SEQUENCE IF EXISTS inject_fault_seq"))
    ctx = runner.scheduler.get_context(world_id)
    # Two attempts failed inside the database and rolled back; the third committed
    # within the same tick: no backoff, no lost time, NPC decisions written once.
    assert ctx.ticks_failed == 2
    assert runner.ticks_ok == 1 and runner.ticks_failed == 0
    assert await world_state(store, world_id) == (pytest.approx(10.0), 1)
    async with store.engine.connect() as conn:
        decisions = (
            await conn.execute(text("SELECT sum(decisions) FROM npcs WHERE world_id = :w"), {"w": world_id})
        ).scalar_one()
    assert decisions == 3


async def test_idle_loop_shows_progress_every_idle_wake(store: Store) -> None:
    """No worlds at all: the loop still wakes (and counts progress) for the watchdog."""
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        WorldScheduler(store), store, clock=clock, limits=RunnerLimits(discovery_interval_seconds=3600)
    )
    runner.idle_wake_seconds = 0.25  # the daemon sets a quarter of WATCHDOG_USEC
    task = asyncio.create_task(runner.start())
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        for _ in range(4):
            for _ in range(100):  # let the loop reach its wait
                if clock.next_wakeup() == pytest.approx(clock.now() + 0.25):
                    break
                await asyncio.sleep(0)
            assert clock.next_wakeup() == pytest.approx(clock.now() + 0.25)
            before = runner.progress
            clock.advance(0.25)
            for _ in range(100):
                if runner.progress > before:
                    break
                await asyncio.sleep(0)
            assert runner.progress > before
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=30)


async def test_applying_limits_discovers_at_once(store: Store) -> None:
    """A reload re-reads which worlds should run right away, not one discovery interval later."""
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        WorldScheduler(store), store, clock=clock, limits=RunnerLimits(discovery_interval_seconds=3600)
    )
    task = asyncio.create_task(runner.start())
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        world_id, _ = await make_world(store)
        runner.set_limits(runner.limits)  # what a SIGHUP with unchanged [scheduler] settings does
        deadline = asyncio.get_running_loop().time() + 30
        while world_id not in runner.world_ids:  # the virtual clock stands still: only the reload can do it
            assert asyncio.get_running_loop().time() < deadline, "the new world was not discovered"
            await asyncio.sleep(0.01)
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=30)


async def _settle(runner: SchedulerLoopRunner) -> None:
    """Until the loop has nothing dispatched or running (bounded: the ticks do real database I/O)."""
    deadline = asyncio.get_running_loop().time() + 30
    await asyncio.sleep(0)
    while runner._inflight or runner._ready:
        assert asyncio.get_running_loop().time() < deadline, "ticks did not finish"
        await asyncio.sleep(0.001)


async def test_running_loop_ticks_every_slot_at_its_deadline(store: Store) -> None:
    """start(): the tick timer serves every grid slot, re-armed when a world added mid-sleep is due first."""
    slow, _ = await make_world(store, name="slow", simulation={"tickIntervalSeconds": 2.0, "timeScale": 10})
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        WorldScheduler(store), store, clock=clock, limits=RunnerLimits(discovery_interval_seconds=3600)
    )
    task = asyncio.create_task(runner.start())
    try:
        await asyncio.wait_for(runner.discovered.wait(), timeout=30)
        await _settle(runner)
        clock.advance(0.5)
        await _settle(runner)
        # Added while the tick timer waits for the slow world's slot at 2.0:
        # its first slot (1.0) comes first, so the timer must move.
        fast, _ = await make_world(store, name="fast", simulation={"tickIntervalSeconds": 0.5, "timeScale": 10})
        await runner.add_world(fast, first_deadline=1.0)
        for _ in range(19):  # to 10.0 in 0.5 s steps; every slot is due exactly at a step
            clock.advance(0.5)
            await _settle(runner)
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=30)
    # Slow: slots 2, 4, …, 10. Fast: 1.0, 1.5, …, 10.0, the first covering 1.0 - 0.5.
    assert await world_state(store, slow) == (pytest.approx(100.0), 5)
    assert await world_state(store, fast) == (pytest.approx(95.0), 19)
    assert runner.ticks_failed == 0
    stats = runner.get_stats()["worlds"]
    assert stats[slow]["ticks_skipped"] == 0 and stats[fast]["ticks_skipped"] == 0


async def _advanced_at(store: Store, world_ids: list[int]) -> dict[int, object]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT world_id, last_advanced_at FROM world_states"))).all()
    return {int(w): at for w, at in rows if int(w) in world_ids}


@pytest.mark.parametrize("phase_slot", [0.05, 0.0])
async def test_worlds_due_within_one_phase_slot_tick_as_one_batch(store: Store, phase_slot: float) -> None:
    """Five 1 Hz worlds whose first ticks fall in one 50 ms slot share every deadline; a sixth is a slot later.

    A batch stamps its worlds with one wall time (``last_advanced_at``): equal
    stamps mean one grouped commit. Without phase slots each ticks on its own.
    """
    ids = [(await make_world(store, name=f"w{i}", session=False))[0] for i in range(6)]
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        WorldScheduler(store),
        store,
        clock=clock,
        limits=RunnerLimits(discovery_interval_seconds=3600, phase_slot_seconds=phase_slot),
    )
    firsts = [1.001, 1.011, 1.021, 1.031, 1.041, 1.061]
    for world_id, first in zip(ids, firsts, strict=True):
        await runner.add_world(world_id, first_deadline=first)
    for second in (1, 2):
        await runner.run_until(second + 0.2)
        stamps = await _advanced_at(store, ids)
        if phase_slot:
            assert len({stamps[w] for w in ids[:5]}) == 1  # one batch
            assert stamps[ids[5]] != stamps[ids[0]]  # the next slot: a batch of its own
        else:
            assert len(set(stamps.values())) == 6
    assert [(await world_state(store, w))[1] for w in ids] == [2] * 6
    assert runner.get_stats()["worlds"][ids[0]]["ticks_skipped"] == 0


def test_phase_slots_are_at_most_an_eighth_of_the_interval_and_hold_one_batch() -> None:
    phases = PhaseSlots()
    assert phases.width(1.0, 0.05) == (pytest.approx(0.05), 20)
    assert phases.width(0.2, 0.05) == (pytest.approx(0.025), 8)  # 25 ms slots for 0.2 s worlds
    assert phases.width(1.0, 0.0) is None
    anchor, key = phases.place(1.001, 1.0, 0.05, capacity=2)
    assert anchor == pytest.approx(1.05) and key == (1.0, 0, 1)
    assert phases.place(1.05, 1.0, 0.05, capacity=2)[0] == pytest.approx(1.05)  # on the grid: stays
    assert phases.place(1.01, 1.0, 0.05, capacity=2)[0] == pytest.approx(1.10)  # full: the next slot
    assert phases.place(2.04, 1.0, 0.05, capacity=2)[0] == pytest.approx(2.10)  # the same slot a second later
    phases.release(key)
    assert phases.place(1.03, 1.0, 0.05, capacity=2) == (pytest.approx(1.05), (1.0, 0, 1))  # room again
    assert phases.place(1.03, 1.0, 0.05, capacity=2)[0] == pytest.approx(1.15)  # for exactly one: 1.05, 1.10 full


def test_full_phase_slots_open_layers_between_them() -> None:
    """Eight 25 ms slots of 0.2 s worlds, one world each: then 12.5 ms in, then 6.25 ms and 18.75 ms in."""
    phases = PhaseSlots()
    placed = [phases.place(0.0, 0.2, 0.05, capacity=1) for _ in range(8 * 4)]
    starts = sorted(round(anchor % 0.2, 6) for anchor, _ in placed)
    assert starts == sorted(round(i * 0.00625, 6) for i in range(32))  # every 6.25 ms, each once
    assert {key[1] for _, key in placed if key is not None} == {0, 1, 2, 3}
    anchor, key = placed[-1]
    phases.release(key)
    assert phases.place(0.0, 0.2, 0.05, capacity=1) == (pytest.approx(anchor), key)  # the freed slot again
    # A larger batch (a reload): full slots have room again, its own slot first.
    assert phases.place(0.0, 0.2, 0.05, capacity=2) == (0.0, (0.2, 0, 0))
