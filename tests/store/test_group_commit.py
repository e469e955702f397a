"""Grouped ticks: several worlds per transaction, each world still atomic and isolated."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import PendingRollbackError

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.simulation.behavior import BehaviorContent, decide
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier
from scheduler_daemon.store.errors import StaleWorldStateError, is_transient
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.ticks import PG_NPCS_PER_SELECT, _pg_selection_chunks
from tests.support.helpers import (
    drop_commit_failure,
    drop_trigger,
    install_commit_failure,
    install_failing_trigger,
    make_world,
    npc_rows,
    world_state,
)

FUSE_GROUPS = 1000


class RecordingScheduler(WorldScheduler):
    """A real WorldScheduler that remembers the size of every group it was handed."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.groups: list[list[int]] = []
        #: Stopped after FUSE_GROUPS groups: a runner retrying a failing group at once
        #: forever (virtual time standing still) must fail the test, not hang it.
        self.fuse: SchedulerLoopRunner | None = None

    async def tick_worlds(
        self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None
    ) -> list[TickResult | BaseException]:
        self.groups.append([w for w, _ in requests])
        if self.fuse is not None and len(self.groups) >= FUSE_GROUPS:
            self.fuse.stop()
        return await super().tick_worlds(requests, wall_at=wall_at)


async def recorded_runner(
    store: Store, worlds: int, npcs: int, **runner_kw: Any
) -> tuple[list[int], RecordingScheduler, SchedulerLoopRunner]:
    """``worlds`` worlds of ``npcs`` detailed NPCs, registered with a runner on a virtual clock that records groups."""
    ids = [(await make_world(store, name=f"w{i}", npcs_per_tier={Tier.DETAILED: npcs}))[0] for i in range(worlds)]
    sched = RecordingScheduler(store)
    runner = SchedulerLoopRunner(sched, store, clock=VirtualClock(), limits=RunnerLimits(**runner_kw))
    sched.fuse = runner  # a runner retrying a failing group at once forever fails the test, not hangs it
    for w in ids:
        await runner.add_world(w)
    return ids, sched, runner


async def test_failing_world_rolls_back_alone_and_its_neighbours_commit(store: Store) -> None:
    a, _ = await make_world(store, name="a", simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 5})
    bad, _ = await make_world(store, name="bad", simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 5})
    b, _ = await make_world(store, name="b", simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 5})
    sched = WorldScheduler(store)
    for w in (a, bad, b):
        await sched.register_world(w)
    bad_rows = await npc_rows(store, bad)
    await install_failing_trigger(store, "npcs", bad)
    try:
        answers = await sched.tick_worlds([(a, 1.0), (bad, 1.0), (b, 1.0)])
    finally:
        await drop_trigger(store, "npcs")
    assert isinstance(answers[0], TickResult) and isinstance(answers[2], TickResult)
    assert isinstance(answers[1], Exception) and "injected fault" in str(answers[1])
    for w in (a, b):
        assert await world_state(store, w) == (pytest.approx(60.0), 1)
        assert all(r[3] == 1 for r in await npc_rows(store, w))  # every NPC decided once
        assert sched.get_context(w).ticks_processed == 1
    # The failing world: nothing written, context untouched, failure recorded.
    assert await world_state(store, bad) == (0.0, 0)
    assert await npc_rows(store, bad) == bad_rows
    ctx = sched.get_context(bad)
    assert (ctx.current_world_time, ctx.ticks_processed) == (0.0, 0)
    assert ctx.state == "failing" and "injected fault" in (ctx.last_error or "")
    # It recovers on its own next tick, covering the elapsed time.
    (again,) = await sched.tick_worlds([(bad, 2.0)])
    assert isinstance(again, TickResult) and again.world_time_after == pytest.approx(120.0)


async def test_world_whose_state_moved_underneath_is_refused_alone_in_its_group(store: Store) -> None:
    """The group's clock moves are one statement; a stale row must still fail only its own world."""
    worlds = [
        (await make_world(store, name=n, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 3}))[0]
        for n in ("a", "stale", "b")
    ]
    a, stale, b = worlds
    sched = WorldScheduler(store)
    for w in worlds:
        await sched.register_world(w)
    stale_rows = await npc_rows(store, stale)
    async with store.transaction() as conn:  # another writer moved the stale world's counter
        await conn.execute(text("UPDATE world_states SET ticks = ticks + 1 WHERE world_id = :w"), {"w": stale})
    answers = await sched.tick_worlds([(w, 1.0) for w in worlds])
    assert isinstance(answers[0], TickResult) and isinstance(answers[2], TickResult)
    assert isinstance(answers[1], StaleWorldStateError) and f"world {stale}" in str(answers[1])
    for w in (a, b):
        assert await world_state(store, w) == (pytest.approx(60.0), 1)
        assert all(r[3] == 1 for r in await npc_rows(store, w))
    assert await world_state(store, stale) == (0.0, 1)  # only the other writer's change
    assert await npc_rows(store, stale) == stale_rows


async def test_failure_of_the_shared_commit_fails_every_world_and_applies_nothing(store: Store) -> None:
    worlds = [(await make_world(store, name=f"w{i}", npcs_per_tier={Tier.ACTIVE: 3}))[0] for i in range(3)]
    sched = WorldScheduler(store)
    for w in worlds:
        await sched.register_world(w)
    await install_commit_failure(store, worlds[2])
    # PostgreSQL: the deferred trigger's exception; SQLite: the deferred foreign key.
    fault = "injected commit fault|FOREIGN KEY constraint failed"
    try:
        with pytest.raises(Exception, match=fault):
            await sched.tick_worlds([(w, 1.0) for w in worlds])
    finally:
        await drop_commit_failure(store)
    for w in worlds:
        assert await world_state(store, w) == (0.0, 0)
        assert all(r[3] == 0 for r in await npc_rows(store, w))
        ctx = sched.get_context(w)
        assert ctx.ticks_processed == 0 and ctx.current_world_time == 0.0
        assert re.search(fault, ctx.last_error or "")


async def test_unknown_and_paused_worlds_in_a_group(store: Store) -> None:
    live, _ = await make_world(store, name="live", npcs_per_tier={Tier.DETAILED: 2})
    paused, _ = await make_world(store, name="paused", simulation={"pauseSimulation": True})
    sched = WorldScheduler(store)
    await sched.register_world(live)
    await sched.register_world(paused)
    answers = await sched.tick_worlds([(live, 1.0), (4242, 1.0), (paused, 1.0)])
    assert isinstance(answers[0], TickResult) and answers[0].npcs_simulated == 2
    assert isinstance(answers[1], WorldNotRegisteredError)
    assert isinstance(answers[2], TickResult) and answers[2].paused and answers[2].delta_game_seconds == 0.0
    assert await world_state(store, paused) == (0.0, 0)
    assert sched.get_context(paused).ticks_processed == 0  # no write, no tick counted (the fence stays true)


async def test_batched_selection_matches_the_per_world_selection(store: Store) -> None:
    worlds = []
    for i in range(4):
        world_id = await store.create_world(f"w{i}", simulation={})
        await store.add_npcs(
            world_id,
            [
                {"name": f"n{j}", "tier": j % 5, "next_decision_at": float((j * 7 + i) % 13)}
                for j in range(40)  # tier 4 (frozen) is never selected
            ],
        )
        worlds.append(world_id)
    requests = [(worlds[0], 5.0, 10), (worlds[1], 12.0, 50), (worlds[2], 0.0, 3), (worlds[3], 8.0, 0)]
    population = {w: await store.get_npcs(w) for w in worlds}
    async with store.transaction() as conn:
        many = await store.select_due_npcs_many(conn, requests)
        for world_id, world_time, limit in requests:
            one = await store.select_due_npcs(conn, world_id, world_time, limit)
            assert [n.id for n in many.npcs[world_id]] == [n.id for n in one]
            due = [n for n in population[world_id] if n.tier != Tier.FROZEN and n.next_decision_at <= world_time]
            expected = sorted(due, key=lambda n: (n.tier, n.next_decision_at, n.id))[:limit]
            assert [n.id for n in one] == [n.id for n in expected]
    assert many.npcs[worlds[3]] == [] and many.quarantined == {}


async def test_runner_groups_due_worlds_and_a_failing_world_ticks_alone(store: Store) -> None:
    # No phase slots: they would hold four worlds each (one batch) and spread the ten over three deadlines.
    worlds, sched, runner = await recorded_runner(
        store, 10, 2, max_batch_size=4, backoff_base_seconds=1.0, phase_slot_seconds=0.0
    )
    await runner.run_until(1.0)
    # Ten worlds due at the same moment: groups of at most four, every world once.
    assert [len(g) for g in sched.groups] == [4, 4, 2]
    assert sorted(w for g in sched.groups for w in g) == worlds

    bad = worlds[5]
    await install_failing_trigger(store, "npcs", bad)
    try:
        sched.groups.clear()
        await runner.run_until(2.0)  # bad fails inside its group; the others commit
        assert runner.scheduler.get_context(bad).state == "failing"
        assert all(runner.scheduler.get_context(w).ticks_processed == 2 for w in worlds if w != bad)
        sched.groups.clear()
        await runner.run_until(6.0)
        # While it keeps failing it is retried in a group of its own.
        assert [bad] in sched.groups
        assert all(len(g) == 1 for g in sched.groups if bad in g)
    finally:
        await drop_trigger(store, "npcs")
    assert all(runner.scheduler.get_context(w).ticks_processed == 6 for w in worlds if w != bad)


async def test_a_large_dispatch_is_spread_over_the_workers_in_batches_of_at_least_16(store: Store) -> None:
    # All 40 worlds fall due together. One batch of 40 would leave the
    # database idle while the daemon decides and the daemon idle while the
    # database writes; spread over the workers, the batches overlap.
    worlds, sched, runner = await recorded_runner(store, 40, 1, max_concurrent_ticks=2, max_batch_size=64)
    await runner.run_until(1.0)
    assert [len(g) for g in sched.groups] == [20, 20]  # two workers: halves
    runner.set_limits(RunnerLimits(max_concurrent_ticks=8))
    sched.groups.clear()
    await runner.run_until(2.0)
    assert [len(g) for g in sched.groups] == [16, 16, 8]  # eight workers, but no batch below 16 worlds
    assert sorted(w for g in sched.groups for w in g) == worlds


async def test_world_failing_the_shared_commit_never_shares_a_group_again(store: Store) -> None:
    """Fault 4's batch-isolation rule, on a fault that fails a group as a whole.

    A failure of the shared COMMIT (like a batch timeout) does not say which
    world caused it: every world of the group is retried at once, alone, and
    from then on the failing world ticks in a group of its own until it
    succeeds. Without the rule it would take its neighbours' shared
    transaction down at every tick (or, retried at once with them, forever).
    """
    # Without the rule the failing group would be retried at once forever (the fuse stops it).
    worlds, sched, runner = await recorded_runner(store, 6, 2, backoff_base_seconds=1.0, backoff_max_seconds=4.0)
    bad = worlds[2]
    healthy = [w for w in worlds if w != bad]
    await runner.run_until(1.0)
    assert sched.groups == [worlds]  # due together: one group

    await install_commit_failure(store, bad)
    try:
        sched.groups.clear()
        await runner.run_until(6.0)
        first, *after = sched.groups
        assert first == worlds  # the group that failed at its COMMIT
        shared = [g for g in after if bad in g and len(g) > 1]
        assert not shared, f"world {bad} shared {len(shared)} groups after its first failure, e.g. {shared[:3]}"
        assert after[: len(worlds)] == [[w] for w in worlds]  # each world retried at once, alone
        bad_ctx = runner.scheduler.get_context(bad)
        assert bad_ctx.state == "failing" and bad_ctx.ticks_processed == 1
        assert bad_ctx.ticks_failed == 4  # the group, then alone at 2, 3 and 5 s (backoff 1, 2 s)
        for w in healthy:
            ctx = runner.scheduler.get_context(w)
            # Every slot of the grid committed (the failed group's was retried at
            # once), world time exact: the neighbours lost one attempt, not a tick.
            assert (ctx.ticks_processed, ctx.ticks_skipped, ctx.ticks_failed) == (6, 0, 1), w
            assert await world_state(store, w) == (pytest.approx(6 * 60.0), 6)
    finally:
        await drop_commit_failure(store)
    sched.groups.clear()
    await runner.run_until(11.0)  # its next retry (backoff 4 s) succeeds at 9 s
    assert runner.scheduler.get_context(bad).state == "running"
    assert any(bad in g and len(g) > 1 for g in sched.groups)  # recovered: back in a shared group


@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["terminate", "read_only"])
async def test_a_connection_lost_in_a_grouped_write_fails_the_group_as_transient(pg_store: Store, fault: str) -> None:
    """A connection lost (or demoted to read-only) under the group savepoint is the unit's fault, retried whole.

    The savepoint cannot be rolled back to on such a connection: the original
    error must reach the runner as transient, not an error of the rollback.
    """
    worlds = [(await make_world(pg_store, name=f"w{i}", npcs_per_tier={Tier.DETAILED: 3}))[0] for i in range(2)]
    sched = WorldScheduler(pg_store)
    for w in worlds:
        await sched.register_world(w)
    action = (
        "PERFORM pg_terminate_backend(pg_backend_pid())"
        if fault == "terminate"
        else "PERFORM set_config('transaction_read_only', 'on', true)"
    )
    async with pg_store.transaction() as conn:
        await conn.execute(
            text(f"CREATE FUNCTION lose_connection_fn() RETURNS trigger AS $$ BEGIN {action}; RETURN NULL; END $$ "
                 "LANGUAGE plpgsql")
        )  # fmt: skip
        await conn.execute(
            text("CREATE TRIGGER lose_connection AFTER UPDATE ON npcs FOR EACH STATEMENT "
                 "EXECUTE FUNCTION lose_connection_fn()")
        )  # fmt: skip
    try:
        with pytest.raises(Exception) as raised:
            await sched.tick_worlds([(w, 1.0) for w in worlds])
    finally:
        await drop_trigger(pg_store, "npcs", name="lose_connection")
    assert is_transient(raised.value), repr(raised.value)
    for w in worlds:
        assert await world_state(pg_store, w) == (0.0, 0)


def test_the_selection_is_cut_where_the_limits_would_pass_its_npc_cap() -> None:
    """Each statement's states are one text value (capped at 1 GB): at most PG_NPCS_PER_SELECT due NPCs each."""
    cap = PG_NPCS_PER_SELECT
    requests = [(1, 0.0, cap // 2), (2, 0.0, cap // 2), (3, 0.0, 1), (4, 0.0, cap + 5), (5, 0.0, 0), (6, 0.0, 3)]
    chunks = _pg_selection_chunks(requests)
    assert [[w for w, _, _ in c] for c in chunks] == [[1, 2], [3], [4], [5, 6]]
    assert [w for c in chunks for w, _, _ in c] == [1, 2, 3, 4, 5, 6]


@pytest.mark.postgres
async def test_a_selection_over_the_npc_cap_reads_as_one_selection(pg_store: Store) -> None:
    """Worlds whose limits add up past the cap are read in several statements: the same NPCs, in order."""
    per_world = PG_NPCS_PER_SELECT // 2 + 10
    worlds = [await pg_store.create_world(f"w{i}", simulation={}) for i in range(3)]
    for i, world_id in enumerate(worlds):
        rows = [
            {"name": f"n{j}", "tier": 1 + j % 3, "next_decision_at": float((j * 7 + i) % 13)} for j in range(per_world)
        ]
        await pg_store.add_npcs(world_id, rows)
    requests = [(w, 12.0, per_world) for w in worlds]
    async with pg_store.transaction() as conn:
        many = await pg_store.select_due_npcs_many(conn, requests)
        for world_id, world_time, limit in requests:
            one = await pg_store.select_due_npcs(conn, world_id, world_time, limit)
            assert len(one) == per_world
            assert [(n.id, n.world_id) for n in many.npcs[world_id]] == [(n.id, world_id) for n in one]


@pytest.mark.postgres
async def test_a_session_ended_by_the_server_mid_group_fails_the_group_with_its_own_error(pg_store: Store) -> None:
    """The server's idle-in-transaction timeout ends the session between a slow body and the grouped write.

    The connection is gone: no world is re-run on it (each would fail with
    "Can't reconnect until invalid transaction is rolled back"); the group
    fails with the server's error and the runner retries its worlds alone.
    """

    def slow(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        if npc.name == "slow":
            time.sleep(0.6)  # a plug-in holding the transaction idle past the server's timeout
        return decide(npc, content, world_time, interval)

    worlds = [await pg_store.create_world(f"w{i}", simulation={"alwaysOn": True}) for i in range(2)]
    await pg_store.add_npcs(worlds[0], [{"name": "quick"}])
    await pg_store.add_npcs(worlds[1], [{"name": "slow"}])
    store = Store.from_url(pg_store.engine.url.render_as_string(hide_password=False), idle_in_transaction_timeout=0.2)
    try:
        sched = WorldScheduler(store, decide_fn=slow)
        for w in worlds:
            await sched.register_world(w)
        with pytest.raises(Exception, match="idle-in-transaction") as raised:
            await sched.tick_worlds([(w, 60.0) for w in worlds])
        assert not isinstance(raised.value, PendingRollbackError)
        for w in worlds:
            assert await world_state(store, w) == (0.0, 0)
    finally:
        await store.dispose()
