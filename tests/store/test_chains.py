"""Interaction chains and cooldowns against real databases, driven on a virtual clock."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from scheduler_daemon import chains as ia
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.repository import Store


async def test_one_hour_steps_at_time_scale_3600_fire_one_per_real_second(store: Store) -> None:
    world_id = await store.create_world(
        "w", simulation={"timeScale": 3600, "tickIntervalSeconds": 0.5, "maxCatchUpSeconds": 60}
    )
    session = await store.add_session(world_id, "alice")
    steps = [ia.step(ia.wait_hours(1), {"line": f"step {i}"}) for i in range(5)]
    chain = await ia.start_chain(store, world_id, steps, chain_key="visit", session_id=session, npc_id=7)
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.add_world(world_id)

    for second in range(1, 6):
        await runner.run_until(second - 0.5)
        assert (await ia.get_chain(store, chain)).current_step == second - 1  # not yet
        await runner.run_until(float(second))
        record = await ia.get_chain(store, chain)
        assert record.current_step == second  # exactly one more step per real second
        assert record.fired[-1] == {"step": second - 1, "dueAt": second * 3600.0, "firedAt": second * 3600.0}
    assert record.status == "completed" and record.completed_at == pytest.approx(5 * 3600.0)
    assert record.next_step_at is None
    await runner.run_until(6.0)
    assert len((await ia.get_chain(store, chain)).fired) == 5  # nothing fires twice


async def test_long_catch_up_tick_fires_every_due_step_in_order(store: Store) -> None:
    world_id = await store.create_world(
        "w", simulation={"timeScale": 3600, "tickIntervalSeconds": 1, "maxCatchUpSeconds": 600}
    )
    await store.add_session(world_id, "alice")
    waits = [ia.wait_minutes(30), ia.wait_hours(2), ia.wait_seconds(0), ia.wait_days(1), ia.wait_hours(1)]
    chain = await ia.start_chain(store, world_id, [ia.step(w, i) for i, w in enumerate(waits)], chain_key="long")
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.add_world(world_id)
    clock.set(10.0)  # the loop stalled: one tick covers 10 h of game time
    await runner.run_once()
    record = await ia.get_chain(store, chain)
    # Due at 0.5 h, 2.5 h, 2.5 h; step 3 (a day later) is not due yet and nothing was skipped.
    assert [f["step"] for f in record.fired] == [0, 1, 2]
    assert [f["dueAt"] for f in record.fired] == [1800.0, 9000.0, 9000.0]
    assert {f["firedAt"] for f in record.fired} == {36000.0}
    assert record.current_step == 3 and record.next_step_at == pytest.approx(9000.0 + 86400.0)
    assert runner.scheduler.get_context(world_id).chain_steps_last_tick == 3


async def test_steps_per_tick_are_bounded_and_the_rest_fire_next_tick_in_order(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"timeScale": 1, "maxChainStepsPerStep": 3})
    await store.add_session(world_id, "u")
    a = await ia.start_chain(store, world_id, [{"wait": 0}] * 4, chain_key="a")
    b = await ia.start_chain(store, world_id, [{"wait": 0.5}] * 2, chain_key="b")
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    first = await sched.tick_world(world_id, 1.0)
    assert first.chain_steps == 3
    second = await sched.tick_world(world_id, 1.0)
    assert second.chain_steps == 3
    ra, rb = await ia.get_chain(store, a), await ia.get_chain(store, b)
    assert [f["step"] for f in ra.fired] == [0, 1, 2, 3] and ra.status == "completed"
    assert [f["step"] for f in rb.fired] == [0, 1] and rb.status == "completed"
    assert [f["dueAt"] for f in rb.fired] == [0.5, 1.0]


async def test_broken_chain_row_is_failed_and_the_others_advance(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"timeScale": 1})
    await store.add_session(world_id, "u")
    broken = await ia.start_chain(store, world_id, [{"wait": 0}], chain_key="broken")
    fine = await ia.start_chain(store, world_id, [{"wait": 0}], chain_key="fine")
    async with store.transaction() as conn:
        await conn.execute(
            text("UPDATE interaction_chains SET steps = :s WHERE id = :id"), {"s": '[{"wait": -5}]', "id": broken}
        )
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    result = await sched.tick_world(world_id, 1.0)
    assert result.chain_steps == 1
    bad = await ia.get_chain(store, broken)
    assert bad.status == "failed" and "steps[0].wait: must be a finite number >= 0" in (bad.last_error or "")
    assert (await ia.get_chain(store, fine)).status == "completed"
    await sched.tick_world(world_id, 1.0)  # the failed row is never picked up again
    assert sched.get_context(world_id).state == "running"


async def test_start_chain_rejects_bad_input_and_writes_nothing(store: Store) -> None:
    world_id = await store.create_world("w")
    session = await store.add_session(world_id, "u")
    other = await store.create_world("other")
    other_session = await store.add_session(other, "v")
    with pytest.raises(ia.ChainError, match="steps: a chain needs at least one step"):
        await ia.start_chain(store, world_id, [], chain_key="k")
    with pytest.raises(ia.ChainError, match=r"steps\[1\].wait: must be a finite number >= 0"):
        await ia.start_chain(store, world_id, [{"wait": 1}, {"wait": -1}], chain_key="k")
    with pytest.raises(ia.ChainError, match="wait: must be a finite number >= 0"):
        ia.wait_hours(-2)
    with pytest.raises(ia.ChainError, match=r"steps\[0\]: unknown keys delay"):
        await ia.start_chain(store, world_id, [{"delay": 1}], chain_key="k")
    with pytest.raises(ia.ChainError, match=r"steps\[0\].payload: not JSON-serialisable"):
        await ia.start_chain(store, world_id, [{"wait": 1, "payload": {1, 2}}], chain_key="k")
    with pytest.raises(ia.ChainError, match="chain_key"):
        await ia.start_chain(store, world_id, [{"wait": 1}], chain_key="")
    with pytest.raises(ia.WorldNotFoundError, match="world 9999 does not exist"):
        await ia.start_chain(store, 9999, [{"wait": 1}], chain_key="k")
    with pytest.raises(ia.SessionNotFoundError, match=f"world {world_id}: session {other_session} does not exist"):
        await ia.start_chain(store, world_id, [{"wait": 1}], chain_key="k", session_id=other_session)
    assert await ia.list_chains(store) == []
    chain = await ia.start_chain(store, world_id, [{"wait": 60}], chain_key="ok", session_id=session)
    assert await ia.cancel_chain(store, chain) is True
    assert await ia.cancel_chain(store, chain) is False
    with pytest.raises(ia.ChainNotFoundError):
        await ia.cancel_chain(store, 424242)


async def test_cooldowns_use_world_time(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"timeScale": 60})
    session = await store.add_session(world_id, "u")
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 1.0)  # world time 60
    at = await ia.record_interaction(store, world_id, session, 5, "gift")
    assert at == pytest.approx(60.0)
    assert await ia.last_interaction_at(store, world_id, session, 5, "gift") == pytest.approx(60.0)
    cooldown = ia.wait_minutes(5)  # 300 game seconds = 5 real seconds at x60
    assert await ia.is_on_cooldown(store, world_id, session, 5, "gift", cooldown)
    assert not await ia.is_on_cooldown(store, world_id, session, 6, "gift", cooldown)  # another NPC
    for _ in range(4):
        await sched.tick_world(world_id, 1.0)  # 300
    assert await ia.is_on_cooldown(store, world_id, session, 5, "gift", cooldown)
    await sched.tick_world(world_id, 1.0)  # 360 = 60 + 300
    assert not await ia.is_on_cooldown(store, world_id, session, 5, "gift", cooldown)
    # An explicit world time (e.g. the scheduler's in-memory clock) and a second interaction.
    now = sched.get_context(world_id).current_world_time
    await ia.record_interaction(store, world_id, session, 5, "gift", world_time=now)
    assert await ia.is_on_cooldown(store, world_id, session, 5, "gift", cooldown, world_time=now + 299)
    assert not await ia.is_on_cooldown(store, world_id, session, 5, "gift", cooldown, world_time=now + 300)
    with pytest.raises(ia.SessionNotFoundError):
        await ia.record_interaction(store, world_id, 9999, 5, "gift")
