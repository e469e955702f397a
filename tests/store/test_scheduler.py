"""WorldScheduler against real databases: budget, isolation of worlds, atomicity, restart."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from scheduler_daemon.scheduler import WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.errors import WorldNotFoundError
from scheduler_daemon.store.repository import Store
from scheduler_daemon.world_config import WorldConfigError
from tests.support.helpers import (
    drop_commit_failure,
    drop_trigger,
    install_commit_failure,
    install_failing_trigger,
    make_world,
    npc_rows,
    update_world_simulation,
    world_state,
)


async def test_register_creates_state_and_tick_commits(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60})
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert ctx.current_world_time == 0.0
    result = await sched.tick_world(world_id, 1.5)
    assert result.world_time_after == pytest.approx(90.0)
    assert await world_state(store, world_id) == (pytest.approx(90.0), 1)


async def test_budget_takes_exactly_50_highest_tiers_first_and_never_other_worlds(store: Store) -> None:
    per_tier = {Tier.DORMANT: 200, Tier.AMBIENT: 150, Tier.ACTIVE: 100, Tier.DETAILED: 50}  # 500 due
    # Tiny timeScale: nobody decided becomes due again within these 10 ticks.
    world_id, _ = await make_world(
        store, simulation={"maxNpcTicksPerStep": 50, "timeScale": 0.001}, npcs_per_tier=per_tier
    )
    other_id, _ = await make_world(store, name="other", npcs_per_tier={Tier.DETAILED: 30})
    other_before = await npc_rows(store, other_id)

    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    seen_order: list[Tier] = []
    for _ in range(10):
        before = {r[0]: r[3] for r in await npc_rows(store, world_id)}
        result = await sched.tick_world(world_id, 1.0)
        assert result.npcs_simulated == 50
        after = await npc_rows(store, world_id)
        decided = [r for r in after if r[3] == before[r[0]] + 1]
        assert len(decided) == 50
        seen_order.extend(Tier(r[1]) for r in decided)
    # 500 due NPCs over 10 ticks of 50: strict tier order across ticks.
    assert seen_order == sorted(seen_order)
    assert seen_order.count(Tier.DETAILED) == 50 and seen_order.count(Tier.DORMANT) == 200
    assert await npc_rows(store, other_id) == other_before


async def test_most_overdue_first_within_a_tier(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"maxNpcTicksPerStep": 2, "timeScale": 1})
    await store.add_session(world_id, "u")
    ids = await store.add_npcs(
        world_id,
        [
            {"name": f"n{i}", "tier": int(Tier.ACTIVE), "next_decision_at": t}
            for i, t in enumerate([0.5, 0.1, 0.9, 0.3])
        ],
    )
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 1.0)
    decided = {r[0] for r in await npc_rows(store, world_id) if r[3] == 1}
    assert decided == {ids[1], ids[3]}


async def test_commit_failure_leaves_rows_and_context_unchanged(store: Store) -> None:
    world_id, _ = await make_world(store, npcs_per_tier={Tier.DETAILED: 20})
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    await sched.tick_world(world_id, 1.0)
    rows_before = await npc_rows(store, world_id)
    state_before = await world_state(store, world_id)
    ctx_before = (ctx.current_world_time, ctx.ticks_processed)

    # The NPC updates run first in the transaction; the world-state update then fails.
    await install_failing_trigger(store, "world_states", world_id)
    try:
        with pytest.raises(Exception, match="injected fault"):
            await sched.tick_world(world_id, 100.0)
        assert await npc_rows(store, world_id) == rows_before
        assert await world_state(store, world_id) == state_before
        assert (ctx.current_world_time, ctx.ticks_processed) == ctx_before
        assert ctx.last_error is not None and "injected fault" in ctx.last_error
    finally:
        await drop_trigger(store, "world_states")
    # Recovery: the next tick commits normally.
    result = await sched.tick_world(world_id, 1.0)
    assert result.world_time_before == ctx_before[0]
    assert ctx.state == "running"


async def test_restart_resumes_from_last_committed_tick(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"timeScale": 60})
    first = WorldScheduler(store)
    await first.register_world(world_id)
    for _ in range(5):
        await first.tick_world(world_id, 1.0)
    await first.unregister_world(world_id)

    second = WorldScheduler(store)
    ctx = await second.register_world(world_id)
    assert ctx.current_world_time == pytest.approx(300.0)
    assert ctx.ticks_processed == 5
    await second.tick_world(world_id, 1.0)
    assert await world_state(store, world_id) == (pytest.approx(360.0), 6)


async def test_paused_world_writes_nothing(store: Store) -> None:
    world_id, _ = await make_world(store, simulation={"pauseSimulation": True}, npcs_per_tier={Tier.DETAILED: 5})
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    result = await sched.tick_world(world_id, 10.0)
    assert result.paused and result.delta_game_seconds == 0 and result.npcs_simulated == 0
    assert await world_state(store, world_id) == (0.0, 0)
    # Nothing was written, so the context's tick counter (the write fence) still matches the row.
    assert sched.get_context(world_id).ticks_processed == 0


async def test_paused_ticks_are_not_counted_so_the_next_tick_passes_its_fence(store: Store) -> None:
    """A paused tick writes nothing, so it must not move the tick counter the fence compares with."""
    world_id, _ = await make_world(
        store, simulation={"pauseSimulation": True, "timeScale": 60}, npcs_per_tier={Tier.DETAILED: 5}
    )
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    for _ in range(3):
        await sched.tick_world(world_id, 1.0)
    assert ctx.ticks_processed == 0  # mirrors world_states.ticks
    await update_world_simulation(store, world_id, {"pauseSimulation": False, "timeScale": 60})
    await sched.reload_world(world_id)
    result = await sched.tick_world(world_id, 1.0)
    assert result.delta_game_seconds == pytest.approx(60.0)
    assert await world_state(store, world_id) == (pytest.approx(60.0), 1)
    assert ctx.ticks_processed == 1


async def test_invalid_stored_config_names_world_and_field(store: Store) -> None:
    world_id = await store.create_world("bad", simulation={"timeScale": -1})
    with pytest.raises(WorldConfigError, match=rf"world {world_id}: .*simulation.timeScale"):
        await WorldScheduler(store).register_world(world_id)


async def test_unknown_worlds(store: Store) -> None:
    sched = WorldScheduler(store)
    with pytest.raises(WorldNotFoundError):
        await sched.register_world(12345)
    with pytest.raises(WorldNotRegisteredError):
        await sched.tick_world(12345, 1.0)


async def test_discovery_finds_sessions_and_always_on(store: Store) -> None:
    with_session, _ = await make_world(store, name="a")
    no_session, _ = await make_world(store, name="b", session=False)
    always_on, _ = await make_world(store, name="c", session=False, simulation={"alwaysOn": True})
    active = await store.discover_active_worlds()
    assert set(active) == {with_session, always_on}
    assert no_session not in active


async def test_last_advanced_at_is_the_ticks_start_not_its_commit(store: Store) -> None:
    """World time corresponds to the tick's start; slow work inside the tick must not shift the stamp."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    world_id, _ = await make_world(store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 1})
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    async with store.transaction() as conn:  # writing the tick's NPC decision takes >= 0.3 s
        if store.dialect == "sqlite":
            await conn.execute(
                text("CREATE TRIGGER slow BEFORE UPDATE ON npcs BEGIN SELECT length(hex(randomblob(30000000))); END")
            )
        else:
            await conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION slow_fn() RETURNS trigger AS $$ "
                    "BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text("CREATE TRIGGER slow BEFORE UPDATE ON npcs FOR EACH ROW EXECUTE FUNCTION slow_fn()")
            )
    try:
        before = datetime.now(UTC)
        await sched.tick_world(world_id, 1.0)
        after = datetime.now(UTC)
        stamp = (await store.get_world(world_id)).last_advanced_at
    finally:
        async with store.transaction() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS slow" + ("" if store.dialect == "sqlite" else " ON npcs")))
    assert stamp is not None
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    slow = (after - before).total_seconds()
    assert slow >= 0.1  # the commit really was slow
    assert before <= stamp <= before + (after - before) / 3, (before, stamp, after)


async def test_reload_with_a_written_record_applies_it_and_never_goes_back(store: Store) -> None:
    """The admin API hands the record it just wrote: applied as is, unless a newer config already runs."""
    world_id, _ = await make_world(store, simulation={"timeScale": 60})
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    v2 = await update_world_simulation(store, world_id, {"timeScale": 120})
    record = await store.get_world(world_id)
    assert record.config_version == v2
    # Applied from the record itself: the database is not read again.
    newer = dataclasses.replace(record, meta={**record.meta, "simulation": {"timeScale": 7}}, config_version=v2 + 5)
    ctx = await sched.reload_world(world_id, record=newer)
    assert (ctx.config.time_scale, ctx.config_version) == (7.0, v2 + 5)
    # An older record (a concurrent writer got there first) changes nothing.
    ctx = await sched.reload_world(world_id, record=record)
    assert (ctx.config.time_scale, ctx.config_version) == (7.0, v2 + 5)


async def test_resync_adopts_the_failed_tick_whose_stamp_the_database_holds(store: Store) -> None:
    """Two failed ticks that moved the clock equally (both capped): the stamp tells which one committed.

    A tick whose COMMIT failed without a known outcome may have committed
    (the reply lost). Here two attempts from the same committed state both
    cover more than ``maxCatchUpSeconds``, so both would write the same world
    time; the runner must measure the next tick from the start of the one that
    committed, or its interval is counted twice (or lost) for the difference.
    """
    world_id, _ = await make_world(store, simulation={"timeScale": 60, "maxCatchUpSeconds": 5})
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    first_at = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    second_at = first_at + timedelta(seconds=0.3)
    await install_commit_failure(store, world_id)
    try:
        for delta, at in ((100.0, first_at), (100.3, second_at)):
            with pytest.raises(DBAPIError):  # fails at COMMIT, so its outcome is unknown to the scheduler
                await sched.tick_world(world_id, delta, wall_at=at)
    finally:
        await drop_commit_failure(store)
    # What the second attempt leaves behind had it committed and only its reply been lost.
    async with store.transaction() as conn:
        await conn.execute(
            text("UPDATE world_states SET world_time = 300.0, ticks = 1, last_advanced_at = :at WHERE world_id = :w"),
            {"at": second_at, "w": world_id},
        )
    ctx = await sched.resync_world(world_id)
    assert (ctx.current_world_time, ctx.ticks_processed) == (300.0, 1)
    assert ctx.adopted_real_seconds == pytest.approx(100.3)
