"""Rows the daemon reads in bulk, poisoned one at a time: the poison stays with its row.

Against both real databases. Every query over many worlds or sessions checks
each row on its own, so a bad value isolates (or leaves out) that row and
names the field, and nothing else stops: discovery, the world listing,
tiering, the merge of concurrent config writes, a deleted state row.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.base import MAX_WORLD_META_BYTES
from scheduler_daemon.store.errors import InvalidStoredWorldError
from scheduler_daemon.store.models import world_states
from scheduler_daemon.store.repository import Store
from tests.support.helpers import update_world_simulation, world_state

#: label -> stored meta (JSON text); every one must be discovered and then isolated.
POISON = {
    "alwaysOn-string": {"simulation": {"alwaysOn": "yes"}},
    "alwaysOn-number": {"simulation": {"alwaysOn": 1}},
    "alwaysOn-array": {"simulation": {"alwaysOn": [True]}},
    "alwaysOn-object": {"simulation": {"alwaysOn": {}}},
    "simulation-string": {"simulation": "on"},
    "meta-array": [1],
    "meta-null": None,
}


async def _insert_world(store: Store, raw_meta: str, name: str = "poison") -> int:
    cast = "CAST(:m AS jsonb)" if store.dialect == "postgresql" else ":m"
    async with store.transaction() as conn:
        return int(
            (
                await conn.execute(
                    sa.text(f"INSERT INTO worlds (name, meta) VALUES (:n, {cast}) RETURNING id"),
                    {"n": name, "m": raw_meta},
                )
            ).scalar_one()
        )


async def test_discovery_returns_poisoned_worlds_instead_of_failing(store: Store) -> None:
    healthy = await store.create_world("healthy", simulation={"alwaysOn": True})
    inactive = await store.create_world("inactive", simulation={"alwaysOn": False})
    poisoned = {label: await _insert_world(store, json.dumps(meta)) for label, meta in POISON.items()}
    if store.dialect == "sqlite":
        poisoned["not-json"] = await _insert_world(store, '{"simulation": ')
    active = await store.discover_active_worlds()
    assert healthy in active and inactive not in active
    assert set(poisoned.values()) <= set(active)
    # Each registration fails on its own, naming the world and the field.
    sched = WorldScheduler(store)
    answers = await sched.register_worlds([(w, None) for w in active])
    assert not isinstance(answers[healthy], Exception)
    for label, world_id in poisoned.items():
        error = answers[world_id]
        assert isinstance(error, ValueError), label
        assert f"world {world_id}" in str(error), (label, error)
        word = "alwaysOn" if label.startswith("alwaysOn") else label.split("-")[0]
        assert word in str(error) or (label == "not-json" and "JSON" in str(error)), (label, error)


async def test_world_records_report_their_problem_per_row(store: Store) -> None:
    healthy = await store.create_world("healthy", simulation={"alwaysOn": True})
    array = await _insert_world(store, json.dumps([1, 2]))
    huge = await _insert_world(store, json.dumps({"simulation": {}, "notes": "x" * (MAX_WORLD_META_BYTES + 1)}))
    records = {r.id: r for r in await store.list_worlds()}
    assert records[healthy].problem is None
    assert "expected a JSON object, got array" in str(records[array].problem)
    assert "larger than the limit" in str(records[huge].problem) and records[huge].meta == {}
    with pytest.raises(InvalidStoredWorldError, match=f"world {array}: meta"):
        (await store.get_world(array)).require_valid()
    assert await store.world_names([healthy, array]) == {healthy: "healthy", array: "poison"}


async def test_a_fix_by_plain_sql_moves_the_config_version(store: Store) -> None:
    world_id = await _insert_world(store, json.dumps({"simulation": {"alwaysOn": "yes"}}))
    before = (await store.get_world(world_id)).config_version
    cast = "CAST(:m AS jsonb)" if store.dialect == "postgresql" else ":m"
    async with store.transaction() as conn:
        await conn.execute(
            sa.text(f"UPDATE worlds SET meta = {cast} WHERE id = :w"),
            {"m": json.dumps({"simulation": {"alwaysOn": True}}), "w": world_id},
        )
    assert (await store.get_world(world_id)).config_version == before + 1
    # The daemon's own writes bump it once, not twice.
    version = await update_world_simulation(store, world_id, {"alwaysOn": True, "timeScale": 2})
    assert version == before + 2


async def test_an_isolated_world_runs_once_its_row_is_fixed(store: Store) -> None:
    world_id = await _insert_world(store, json.dumps({"simulation": {"alwaysOn": 1}}))
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock())
    await runner.discover()
    assert world_id in runner.broken and "alwaysOn" in runner.broken[world_id].error
    async with store.transaction() as conn:
        cast = "CAST(:m AS jsonb)" if store.dialect == "postgresql" else ":m"
        await conn.execute(
            sa.text(f"UPDATE worlds SET meta = {cast} WHERE id = :w"),
            {"m": json.dumps({"simulation": {"alwaysOn": True}}), "w": world_id},
        )
    await runner.discover()
    assert world_id in runner.world_ids and world_id not in runner.broken


async def test_an_unreadable_session_is_left_out_of_tiering_and_reported(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "n", "location": "square"}])
    good = await store.add_session(world_id, "alice", location="square", scene_npc_ids=[npc])
    bad = await store.add_session(world_id, "mallory", location="square")
    cast = "CAST(:v AS jsonb)" if store.dialect == "postgresql" else ":v"
    async with store.transaction() as conn:
        await conn.execute(
            sa.text(f"UPDATE sessions SET scene_npc_ids = {cast} WHERE id = :s"), {"v": '"everyone"', "s": bad}
        )
    read = await store.active_session_views()
    assert [s.id for s in read.views[world_id]] == [good]
    assert [(s.session_id, s.world_id) for s in read.ignored] == [(bad, world_id)]
    assert "scene_npc_ids" in read.ignored[0].problem
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock())
    await runner.discover()
    assert runner.scheduler.ignored_sessions == 1
    assert runner.scheduler.get_context(world_id).tier_population[Tier.DETAILED] == 1


async def test_a_deleted_state_row_is_recreated_from_the_last_committed_clock(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True, "timeScale": 60})
    clock = VirtualClock()
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=clock)
    await runner.discover()
    await runner.run_until(3.0)
    assert await world_state(store, world_id) == (180.0, 3)
    async with store.transaction() as conn:
        await conn.execute(sa.delete(world_states).where(world_states.c.world_id == world_id))
    await runner.run_until(4.0)  # refused (no row), the row is recreated at 180.0 / 3
    await runner.run_until(6.0)
    world_time, ticks = await world_state(store, world_id)
    # No real time lost or counted twice: 6 s at 60x, the refused tick's interval covered by the next.
    assert ticks >= 4 and world_time == pytest.approx(60.0 * 6.0)
    assert runner.scheduler.get_context(world_id).current_world_time == world_time


async def test_concurrent_unconditional_changes_all_merge(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True})

    async def change(i: int) -> None:
        await store.change_world_simulation(world_id, lambda record: {**record.simulation_raw, f"mark{i}": i})

    await asyncio.gather(*(change(i) for i in range(20)))
    record = await store.get_world(world_id)
    assert {f"mark{i}" for i in range(20)} <= set(record.simulation_raw)
    assert record.config_version == 21
