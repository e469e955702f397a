"""NPC simulation wired into the scheduler, against real databases.

Tiers from sessions (at registration, on session changes, on relevant NPC
moves; never every tick), tierRules, frozen NPCs in stats, behaviour content
isolation through the runner, decision lag under an overloaded budget, and
the selection SQL mirroring the pure ``select_due`` model.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.demo import DEMO_BEHAVIOR
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, Tier
from scheduler_daemon.simulation.tiers import NpcPlacement, SessionView, assign_tiers, last_taken, select_due
from scheduler_daemon.store.models import npcs
from scheduler_daemon.store.repository import Store
from tests.support.helpers import (
    make_world,
    npc_rows,
    set_session_active,
    set_world_meta_key,
    update_world_simulation,
    world_state,
)

SMALL_TIERS = {
    "detailed": {"maxNpcs": 2, "decisionIntervalSeconds": 60},
    "active": {"maxNpcs": 3, "decisionIntervalSeconds": 300},
    "ambient": {"maxNpcs": 4, "decisionIntervalSeconds": 1800},
    "dormant": {"maxNpcs": 5, "decisionIntervalSeconds": 7200},
}


async def stored_tiers(store: Store, world_id: int) -> dict[int, Tier]:
    return {r[0]: Tier(r[1]) for r in await npc_rows(store, world_id)}


async def add_plain_npcs(store: Store, world_id: int, n: int, **fields: Any) -> list[int]:
    return await store.add_npcs(world_id, [{"name": f"n{i}", **fields} for i in range(n)])


# --- tiers from sessions ----------------------------------------------------------


async def test_registration_assigns_tiers_from_sessions_under_capacity_and_counts_frozen(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"tiers": SMALL_TIERS})
    # 20 NPCs against 2+3+4+5 = 14 seats: 6 must be frozen.
    ids = await add_plain_npcs(store, world_id, 17, location="farm", home="hill")
    ids += await add_plain_npcs(store, world_id, 3, location="square", home="hill")
    await store.add_session(world_id, "alice", location="square", scene_npc_ids=ids[:1], involved_npc_ids=ids[1:4])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)

    sessions = [SessionView(1, "alice", "square", frozenset(ids[:1]), frozenset(ids[1:4]))]
    placements = [NpcPlacement(i, "farm" if i not in ids[17:] else "square", "hill") for i in ids]
    caps = ctx.config.tiers.capacities()
    expected = assign_tiers(placements, sessions, caps)
    assert await stored_tiers(store, world_id) == expected.tiers
    stats = ctx.get_stats()
    assert stats["frozen_npcs"] == 6
    assert stats["tier_population"] == {"detailed": 2, "active": 3, "ambient": 4, "dormant": 5, "frozen": 6}
    # Scene NPC and one at the player's location are detailed; the other two
    # at the location were demoted into active ahead of the involved NPCs.
    tiers = await stored_tiers(store, world_id)
    assert tiers[ids[0]] == Tier.DETAILED and tiers[ids[17]] == Tier.DETAILED
    assert tiers[ids[18]] == tiers[ids[19]] == Tier.ACTIVE

    # Frozen NPCs are never selected, however overdue.
    result = await sched.tick_world(world_id, 1.0)
    assert result.npcs_simulated == 14
    frozen = {i for i, t in tiers.items() if t == Tier.FROZEN}
    assert all(r[3] == 0 for r in await npc_rows(store, world_id) if r[0] in frozen)


async def test_tiers_follow_session_changes_at_discovery_and_not_every_tick(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True, "timeScale": 60})
    ids = await add_plain_npcs(store, world_id, 6, location="farm", home="hill", next_decision_at=10_000.0)
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.discover()
    ctx = runner.scheduler.get_context(world_id)
    assert set((await stored_tiers(store, world_id)).values()) == {Tier.DORMANT}  # no sessions yet
    refreshes = ctx.tier_refreshes

    await runner.run_until(20.0)  # 20 ticks
    assert await runner.refresh_tiers() == []  # nothing changed: no recomputation
    assert ctx.tier_refreshes == refreshes

    session = await store.add_session(world_id, "bob", location="square", scene_npc_ids=[ids[0]])
    await runner.discover()
    assert ctx.tier_refreshes == refreshes + 1
    tiers = await stored_tiers(store, world_id)
    assert tiers[ids[0]] == Tier.DETAILED and tiers[ids[1]] == Tier.AMBIENT
    # Promotion pulls the next decision to within the new tier's interval.
    now = ctx.current_world_time
    rows = {r[0]: r for r in await npc_rows(store, world_id)}
    assert rows[ids[0]][2] == pytest.approx(now + 60.0)
    assert rows[ids[1]][2] == pytest.approx(now + 1800.0)

    await set_session_active(store, session, False)
    await runner.discover()
    assert set((await stored_tiers(store, world_id)).values()) == {Tier.DORMANT}
    assert ctx.tier_refreshes == refreshes + 2


async def test_npcs_added_by_the_backend_get_their_tier_at_the_periodic_recomputation(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"tiers": SMALL_TIERS})
    await add_plain_npcs(store, world_id, 3)
    await store.add_session(world_id, "u", location="square")
    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        WorldScheduler(store), store, clock=clock, limits=RunnerLimits(tier_refresh_max_seconds=60.0)
    )
    await runner.discover()
    ctx = runner.scheduler.get_context(world_id)
    late = await add_plain_npcs(store, world_id, 2, location="square")  # dormant by the column default
    await runner.run_until(59.0)
    assert await runner.refresh_tiers() == []  # no session change, no relevant move
    await runner.run_until(60.0)
    assert await runner.refresh_tiers() == [world_id]
    tiers = await stored_tiers(store, world_id)
    assert [tiers[i] for i in late] == [Tier.DETAILED, Tier.DETAILED]
    assert ctx.get_stats()["tier_population"]["detailed"] == 2 and await runner.refresh_tiers() == []


MOVER_BEHAVIOR = {
    "activities": {
        "visit": {"durationMinutes": [30, 30], "location": "square"},
        "roam": {"durationMinutes": [30, 30], "location": ["farm", "mill"]},
    },
    "routines": {
        "visitor": {"slots": [{"start": "00:00", "end": "00:00", "activities": {"visit": 1}}]},
        "roamer": {"slots": [{"start": "00:00", "end": "00:00", "activities": {"roam": 1}}]},
    },
    "defaultRoutine": "roamer",
}


async def test_moves_only_to_or_from_player_locations_trigger_recomputation(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"timeScale": 60}, meta={"behavior": MOVER_BEHAVIOR})
    roamer, visitor = await store.add_npcs(
        world_id,
        [
            {"name": "roamer", "location": "farm", "routine": "roamer"},
            {"name": "visitor", "location": "farm", "routine": "visitor", "next_decision_at": 100.0},
        ],
    )
    await store.add_session(world_id, "alice", location="square")
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.discover()
    ctx = runner.scheduler.get_context(world_id)
    await runner.run_until(1.0)  # world time 60: only the roamer decides (farm/mill)
    assert ctx.tiers_stale is False
    await runner.run_until(2.0)  # world time 120: the visitor walks to the player's square
    assert ctx.tiers_stale is True
    assert (await stored_tiers(store, world_id))[visitor] == Tier.AMBIENT  # not recomputed inside the tick
    assert await runner.refresh_tiers() == [world_id]
    tiers = await stored_tiers(store, world_id)
    assert tiers[visitor] == Tier.DETAILED and tiers[roamer] == Tier.AMBIENT
    assert ctx.tiers_stale is False


async def test_tier_rules_pin_npcs_and_invalid_rules_isolate_the_world(store: Store) -> None:
    world_id = await store.create_world(
        "w", simulation={"alwaysOn": True, "tierRules": [{"match": {"location": "market"}, "tier": "active"}]}
    )
    market, farm = await store.add_npcs(world_id, [{"name": "m", "location": "market"}, {"name": "f"}])
    good, _ = await make_world(store, name="good")
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock())
    await runner.discover()
    assert await stored_tiers(store, world_id) == {market: Tier.ACTIVE, farm: Tier.DORMANT}

    await update_world_simulation(store, world_id, {"alwaysOn": True, "tierRules": [{"match": {}, "tier": "active"}]})
    await runner.discover()
    assert runner.world_ids == [good]
    error = runner.broken[world_id].error
    assert f"world {world_id}" in error and "simulation.tierRules.0.match" in error


# --- behaviour content isolation --------------------------------------------------


async def test_invalid_behavior_isolates_only_that_world_and_recovers_when_fixed(store: Store) -> None:
    bad_behavior = {**DEMO_BEHAVIOR, "defaultRoutine": "hermit"}
    good, _ = await make_world(store, name="good", behavior=DEMO_BEHAVIOR, npcs_per_tier={Tier.DETAILED: 3})
    bad, _ = await make_world(store, name="bad", behavior=bad_behavior, npcs_per_tier={Tier.DETAILED: 3})
    later, _ = await make_world(store, name="later", behavior=DEMO_BEHAVIOR, npcs_per_tier={Tier.DETAILED: 3})
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.discover()
    assert runner.world_ids == [good, later]
    assert runner.broken[bad].error.startswith(f"world {bad}: behavior.defaultRoutine: unknown routine 'hermit'")
    await runner.run_until(5.0)
    assert (await world_state(store, good))[1] == 5 and (await world_state(store, bad))[1] == 0

    # Content breaking while a world runs isolates it at the next discovery.
    await set_world_meta_key(store, later, "behavior", {"activities": {"nap": {"durationMinutes": [5, 1]}}})
    await runner.discover()
    assert runner.world_ids == [good]
    assert "behavior.activities.nap.durationMinutes" in runner.broken[later].error
    stats = runner.get_stats()["broken_worlds"]
    assert set(stats) == {bad, later}

    await set_world_meta_key(store, bad, "behavior", DEMO_BEHAVIOR)
    await runner.discover()
    assert runner.world_ids == [good, bad] and bad not in runner.broken
    await runner.run_until(7.0)
    assert (await world_state(store, good))[1] == 7 and (await world_state(store, bad))[1] == 2


# --- budget overload ---------------------------------------------------------------


async def test_overload_lags_the_lowest_tier_reports_it_and_warns_once_per_episode(store: Store) -> None:
    # Per tick of 60 game s: 4 detailed NPCs are due every tick (idle lasts 60 s),
    # 30 ambient NPCs want 3 decisions per tick, but the budget leaves them 1.
    simulation = {
        "timeScale": 60,
        "maxNpcTicksPerStep": 5,
        "tiers": {
            "detailed": {"maxNpcs": 4, "decisionIntervalSeconds": 60},
            "ambient": {"maxNpcs": 30, "decisionIntervalSeconds": 600},
        },
    }
    world_id = await store.create_world("w", simulation=simulation)
    ids = await add_plain_npcs(store, world_id, 34)
    await store.add_session(world_id, "u", location="x", scene_npc_ids=ids[:4])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert ctx.tier_population[Tier.DETAILED] == 4 and ctx.tier_population[Tier.AMBIENT] == 30

    with capture_logs() as logs:
        for _ in range(40):
            await sched.tick_world(world_id, 1.0)
    stats = ctx.get_stats()
    lag = stats["decision_lag_seconds"]
    assert lag["detailed"] <= 60.0
    # The oldest ambient NPC left waiting, not just the decided ones (whose lag
    # would hide the backlog): well past the ambient interval.
    assert lag["ambient"] > 600.0
    assert stats["lagging_tiers"] == ["ambient"] and stats["lag_episodes"] == 1
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["lagging_tiers"] == ["ambient"]

    # A budget that fits: the backlog clears, recovery is logged once.
    await update_world_simulation(store, world_id, {**simulation, "maxNpcTicksPerStep": 40})
    await sched.reload_world(world_id)
    with capture_logs() as logs:
        for _ in range(5):
            await sched.tick_world(world_id, 1.0)
    assert ctx.get_stats()["lagging_tiers"] == []
    (recovered,) = [e for e in logs if e["log_level"] in ("info", "warning")]
    assert recovered["event"] == "npc_decision_lag_recovered" and recovered["recovered_tiers"] == ["ambient"]
    # Its fields agree with it: no ambient NPC waits past the 600 s interval any more, while
    # the NPCs just decided (the backlog being cleared) may still have been long overdue.
    assert all(lag <= 600.0 for lag in recovered["waiting_lag_seconds"].values())
    assert "decision_lag_seconds" not in recovered


# --- the selection SQL mirrors select_due ---------------------------------------------

SQL_MIRROR = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

populations = st.lists(
    st.tuples(st.sampled_from(list(Tier)), st.sampled_from([-5.0, 0.0, 0.5, 3.0, 7.25, 10.0, 1e6])),
    max_size=40,
)


async def test_selection_sql_mirrors_select_due_on_random_populations(store: Store) -> None:
    loop = asyncio.get_running_loop()
    other = await store.create_world("other")
    await add_plain_npcs(store, other, 20, tier=int(Tier.DETAILED), next_decision_at=-100.0)
    world_id = await store.create_world("w")

    def run(coro: Any) -> Any:
        # Hypothesis drives examples from a worker thread; the database work
        # runs on the test's own event loop.
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def check(population: list[tuple[Tier, float]], now: float, budget: int) -> None:
        async with store.transaction() as conn:
            await conn.execute(sa.delete(npcs).where(npcs.c.world_id == world_id))
        ids = await store.add_npcs(
            world_id, [{"name": "n", "tier": int(t), "next_decision_at": at} for t, at in population]
        )
        expected = select_due(((t, at, i) for (t, at), i in zip(population, ids, strict=True)), now, budget)
        async with store.transaction() as conn:
            got = await store.select_due_npcs(conn, world_id, now, budget)
            taken = last_taken(got)
            waiting = await store.oldest_waiting(conn, world_id, now, taken)
            # The grouped form (one statement for a tick's whole group) agrees world by world.
            many = await store.oldest_waiting_many(conn, [(other, now, {}), (world_id, now, taken)])
        assert [n.id for n in got] == expected
        assert many == {world_id: waiting, other: {Tier.DETAILED: -100.0}}
        # The oldest NPC each tier leaves waiting, by the same model.
        for tier in SIMULATED_TIERS:
            left = [
                (at, i)
                for (t, at), i in zip(population, ids, strict=True)
                if t == tier and at <= now and i not in expected
            ]
            assert waiting.get(tier) == (min(left)[0] if left else None)

    @SQL_MIRROR
    @given(populations, st.sampled_from([0.0, 0.5, 7.25, 100.0]), st.integers(0, 45))
    def mirror(population: list[tuple[Tier, float]], now: float, budget: int) -> None:
        run(check(population, now, budget))

    await asyncio.to_thread(mirror)


# --- what the NPCs are doing (periodic INFO summary) --------------------------------


async def test_activity_counts_in_memory_track_the_database(store: Store) -> None:
    world_id, _ = await make_world(
        store,
        simulation={"timeScale": 600},
        behavior=DEMO_BEHAVIOR,
        npcs_per_tier={Tier.DETAILED: 5, Tier.ACTIVE: 5, Tier.AMBIENT: 10},
    )
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock())
    await runner.discover()
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.activity_snapshot()["doing"] == {"undecided": 20}
    seen: set[tuple[str, ...]] = set()
    for step in range(1, 7):
        await runner.run_until(step * 30.0)  # 5 game hours per step
        await runner.refresh_tiers()
        assert ctx.activity_counts == await store.activity_counts(world_id)
        seen.add(tuple(sorted(ctx.activity_snapshot()["doing"])))
    assert len(seen) > 1  # the NPCs changed activities through the day
    snapshot = ctx.activity_snapshot()
    assert snapshot["world_time"] == "day 2 Tue 06:00"
    assert sum(snapshot["doing"].values()) == 20 and snapshot["decisions_total"] == ctx.npcs_simulated_total
