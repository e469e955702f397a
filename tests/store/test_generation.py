"""Generation requests against real databases: budget, quotas, outbox, retries, broken rows, API."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from scheduler_daemon import generation
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import TickResult, WorldScheduler
from scheduler_daemon.store.repository import Store
from tests.support.helpers import drop_trigger, install_failing_trigger


async def world_with_users(store: Store, users: int, simulation: dict[str, Any] | None = None) -> tuple[int, list[int]]:
    world_id = await store.create_world("gen", simulation=simulation or {})
    sessions = [await store.add_session(world_id, f"user-{i}") for i in range(users)]
    return world_id, sessions


async def statuses(store: Store, world_id: int) -> dict[int, tuple[str, str, bool, int]]:
    """id -> (status, user, handed_off, attempts)."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT id, status, user_id, handed_off, attempts FROM generation_requests WHERE world_id = :w"),
                {"w": world_id},
            )
        ).all()
    return {int(r[0]): (r[1], r[2], bool(r[3]), int(r[4])) for r in rows}


async def bulk_requests(
    store: Store, world_id: int, sessions: list[int], count: int, priority: Callable[[int], int] = lambda i: 0
) -> list[int]:
    """``count`` pending requests round-robin over the sessions, in one transaction (fast seeding)."""
    async with store.transaction() as conn:
        return [
            await store.insert_request(
                conn,
                world_id=world_id,
                session_id=sessions[i % len(sessions)],
                user_id=await store.session_user(conn, world_id, sessions[i % len(sessions)]),
                npc_id=None,
                kind="portrait",
                payload={"n": i},
                priority=priority(i),
            )
            for i in range(count)
        ]


def in_flight_by_user(rows: dict[int, tuple[str, str, bool, int]]) -> Counter[str]:
    return Counter(user for status, user, _, _ in rows.values() if status in ("enqueued", "running"))


class RecordingSink:
    """Accepts everything (or fails the first ``fail_times`` calls per request) and records calls."""

    def __init__(self, fail_times: int = 0) -> None:
        self.fail_times = fail_times
        self.calls: list[tuple[int, str]] = []
        self.failures: Counter[int] = Counter()

    async def __call__(self, request: generation.GenerationRequest) -> None:
        self.calls.append((request.id, request.idempotency_key))
        if self.failures[request.id] < self.fail_times:
            self.failures[request.id] += 1
            raise ConnectionError(f"worker pool unreachable for {request.idempotency_key}")


async def test_budget_and_per_user_quota_with_completions_letting_more_flow(store: Store) -> None:
    world_id, sessions = await world_with_users(
        store,
        5,
        {"timeScale": 1, "maxJobOpsPerStep": 10, "generation": {"maxInFlightPerUser": 3, "maxInFlightPerWorld": 1000}},
    )
    ids = await bulk_requests(store, world_id, sessions, 100, priority=lambda i: int(i % 7 == 0))
    sink = RecordingSink()
    sched = WorldScheduler(store, sink=sink)
    await sched.register_world(world_id)
    rng = random.Random(4)

    first = await sched.tick_world(world_id, 1.0)
    assert first.jobs_enqueued == 10  # budget, although 15 would fit the per-user caps
    rows = await statuses(store, world_id)
    claimed_first = sorted(i for i, r in rows.items() if r[0] == "enqueued")
    # Highest priority first (i % 7 == 0: 15 requests, 3 per user), then oldest.
    high = [ids[i] for i in range(100) if i % 7 == 0]
    assert claimed_first == high[:10]
    assert max(in_flight_by_user(rows).values()) <= 3
    assert all(r[2] for i, r in rows.items() if r[0] == "enqueued")  # handed off after commit
    assert sorted(i for i, _ in sink.calls) == claimed_first

    second = await sched.tick_world(world_id, 1.0)
    assert second.jobs_enqueued == 5  # 5 users x 3 = 15 in flight: the quota, not the budget, stops it
    stalled = await sched.tick_world(world_id, 1.0)
    assert stalled.jobs_enqueued == 0  # backpressure: workers are behind, nothing more is handed out

    ticks = 0
    while True:
        rows = await statuses(store, world_id)
        assert max(in_flight_by_user(rows).values(), default=0) <= 3  # after every tick
        if all(r[0] == "succeeded" for r in rows.values()):
            break
        in_flight = [i for i, r in rows.items() if r[0] in ("enqueued", "running")]
        for request_id in rng.sample(in_flight, k=min(len(in_flight), rng.randint(6, 15))):
            await generation.complete_request(store, request_id, "succeeded")
        result = await sched.tick_world(world_id, 1.0)
        ticks += 1
        assert result.jobs_enqueued <= 10
        assert ticks < 200
    assert len(sink.calls) == 100 and len({i for i, _ in sink.calls}) == 100  # each handed out exactly once


async def test_a_zero_job_budget_hands_out_nothing(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 2, {"timeScale": 1, "maxJobOpsPerStep": 0})
    await bulk_requests(store, world_id, sessions, 4)
    sink = RecordingSink()
    sched = WorldScheduler(store, sink=sink)
    await sched.register_world(world_id)
    for _ in range(3):
        assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 0
    assert {r[0] for r in (await statuses(store, world_id)).values()} == {"pending"}
    assert sink.calls == []


async def test_world_quota_caps_in_flight(store: Store) -> None:
    world_id, sessions = await world_with_users(
        store, 10, {"maxJobOpsPerStep": 10, "generation": {"maxInFlightPerWorld": 4, "maxInFlightPerUser": 5}}
    )
    await bulk_requests(store, world_id, sessions, 30)
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 4
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 0
    started = await generation.start_requests(store, limit=2, world_id=world_id)
    assert [r.status for r in started] == ["running", "running"]
    await generation.complete_request(store, started[0].id, "failed", error="model crashed")
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 1
    failed = await generation.get_request(store, started[0].id)
    assert failed.status == "failed" and failed.last_error == "model crashed" and failed.finished_at is not None


async def test_failed_hand_off_returns_to_pending_backs_off_in_world_time_and_retries(store: Store) -> None:
    world_id, sessions = await world_with_users(
        store,
        1,
        {"timeScale": 60, "generation": {"retryBackoffSeconds": 2, "maxAttempts": 5}},
    )
    rid = await generation.create_request(store, world_id, sessions[0], "voice", {"text": "hi"})
    sink = RecordingSink(fail_times=2)
    sched = WorldScheduler(store, sink=sink)
    await sched.register_world(world_id)

    await sched.tick_world(world_id, 1.0)  # world time 60: claimed, hand-off fails
    req = await generation.get_request(store, rid)
    assert (req.status, req.attempts, req.handed_off) == ("pending", 1, False)
    assert req.not_before == pytest.approx(60 + 2 * 60)  # 2 real seconds at timeScale 60
    assert req.last_error is not None and "worker pool unreachable" in req.last_error

    await sched.tick_world(world_id, 1.0)  # world time 120: still backing off
    assert (await generation.get_request(store, rid)).attempts == 1
    await sched.tick_world(world_id, 1.0)  # 180: due, retried, fails again
    req = await generation.get_request(store, rid)
    assert req.status == "pending" and req.attempts == 2
    assert req.not_before == pytest.approx(180 + 4 * 60)  # exponential: 2 s, then 4 s (in game time x60)
    await sched.tick_world(world_id, 1.0)  # 240: backing off
    assert len(sink.calls) == 2
    await sched.tick_world(world_id, 3.0)  # 420: due again, the sink accepts now
    req = await generation.get_request(store, rid)
    assert (req.status, req.handed_off, req.attempts) == ("enqueued", True, 2)
    assert [key for _, key in sink.calls] == [f"generation-request-{rid}"] * 3


async def test_hand_off_gives_up_after_max_attempts_keeping_the_error(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1, {"generation": {"retryBackoffSeconds": 0, "maxAttempts": 3}})
    rid = await generation.create_request(store, world_id, sessions[0], "voice", {})
    sched = WorldScheduler(store, sink=RecordingSink(fail_times=100))
    await sched.register_world(world_id)
    for _ in range(5):
        await sched.tick_world(world_id, 1.0)
    req = await generation.get_request(store, rid)
    assert (req.status, req.attempts) == ("failed", 3)
    assert req.last_error is not None and "unreachable" in req.last_error


async def test_sink_never_sees_a_claim_whose_tick_rolled_back(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1)
    rid = await generation.create_request(store, world_id, sessions[0], "k", {})
    sink = RecordingSink()
    sched = WorldScheduler(store, sink=sink)
    await sched.register_world(world_id)
    await install_failing_trigger(store, "world_states", world_id)
    try:
        with pytest.raises(Exception, match="injected fault"):
            await sched.tick_world(world_id, 1.0)
    finally:
        await drop_trigger(store, "world_states")
    assert sink.calls == []
    assert (await generation.get_request(store, rid)).status == "pending"
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 1
    assert [i for i, _ in sink.calls] == [rid]


async def test_grouped_tick_hands_out_only_the_claims_of_worlds_that_committed(store: Store) -> None:
    """One grouped commit: the world rolled back to its savepoint hands out nothing, its neighbours do."""
    worlds = [await world_with_users(store, 1) for _ in range(3)]
    rids = [await generation.create_request(store, w, s[0], "k", {}) for w, s in worlds]
    (a, _), (bad, _), (c, _) = worlds
    sink = RecordingSink()
    sched = WorldScheduler(store, sink=sink)
    for w, _ in worlds:
        await sched.register_world(w)
    await install_failing_trigger(store, "world_states", bad)
    try:
        answers = await sched.tick_worlds([(a, 1.0), (bad, 1.0), (c, 1.0)])
    finally:
        await drop_trigger(store, "world_states")
    assert isinstance(answers[1], Exception) and "injected fault" in str(answers[1])
    assert [r.jobs_enqueued for r in answers if isinstance(r, TickResult)] == [1, 1]
    assert sorted(i for i, _ in sink.calls) == [rids[0], rids[2]]
    assert (await generation.get_request(store, rids[1])).status == "pending"  # its claim rolled back with its tick
    assert (await sched.tick_world(bad, 1.0)).jobs_enqueued == 1
    assert sorted(i for i, _ in sink.calls) == sorted(rids)


async def test_interrupted_hand_off_is_handed_out_again_by_the_next_scheduler(store: Store) -> None:
    """In-process form of the crash test: the rows stay in the outbox and a fresh scheduler drains them."""
    world_id, sessions = await world_with_users(store, 1)
    rid = await generation.create_request(store, world_id, sessions[0], "k", {})

    class Crash(BaseException):
        pass

    async def crashing_sink(request: generation.GenerationRequest) -> None:
        raise Crash  # not an Exception: escapes like a process dying mid hand-off

    first = WorldScheduler(store, sink=crashing_sink)
    await first.register_world(world_id)
    with pytest.raises(Crash):
        await first.tick_world(world_id, 1.0)
    req = await generation.get_request(store, rid)
    assert (req.status, req.handed_off) == ("enqueued", False)  # committed claim, not handed off

    sink = RecordingSink()
    second = WorldScheduler(store, sink=sink)
    await second.register_world(world_id)
    result = await second.tick_world(world_id, 1.0)
    assert result.jobs_enqueued == 0  # nothing new was claimed ...
    assert sink.calls == [(rid, f"generation-request-{rid}")]  # ... the old claim was handed out again
    assert (await generation.get_request(store, rid)).handed_off


async def test_broken_row_is_failed_with_the_reason_and_the_world_keeps_ticking(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1)
    bad = await generation.create_request(store, world_id, sessions[0], "k", {"ok": True}, priority=5)
    good = await generation.create_request(store, world_id, sessions[0], "k", {"ok": True})
    async with store.transaction() as conn:
        await conn.execute(
            text("UPDATE generation_requests SET payload = :p WHERE id = :id"), {"p": "[1, 2]", "id": bad}
        )
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    result = await sched.tick_world(world_id, 1.0)
    assert result.jobs_enqueued == 1
    broken = await generation.get_request(store, bad)
    assert broken.status == "failed" and "payload: expected a JSON object" in (broken.last_error or "")
    assert (await generation.get_request(store, good)).status == "enqueued"


async def test_create_request_rejects_bad_input_and_writes_nothing(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1)
    other_world, other_sessions = await world_with_users(store, 1)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"payload": ["not", "an", "object"]}, generation.GenerationRequestError, "payload: expected a JSON object"),
        ({"payload": {"x": float("nan")}}, generation.GenerationRequestError, "payload: not JSON-serialisable"),
        ({"payload": {"x": object()}}, generation.GenerationRequestError, "payload: not JSON-serialisable"),
        ({"kind": ""}, generation.GenerationRequestError, "kind"),
        ({"priority": 1.5}, generation.GenerationRequestError, "priority"),
        ({"world_id": 9999}, generation.WorldNotFoundError, "world 9999 does not exist"),
        ({"session_id": 9999}, generation.SessionNotFoundError, f"world {world_id}: session 9999 does not exist"),
        ({"session_id": other_sessions[0]}, generation.SessionNotFoundError, f"session {other_sessions[0]}"),
    ]
    for override, error, message in cases:
        args: dict[str, Any] = {"world_id": world_id, "session_id": sessions[0], "kind": "k", "payload": {}}
        args.update(override)
        with pytest.raises(error, match=message):
            await generation.create_request(
                store,
                args["world_id"],
                args["session_id"],
                args["kind"],
                args["payload"],
                priority=args.get("priority", 0),
            )
    assert await generation.list_requests(store) == []
    assert other_world != world_id


async def test_completion_transitions(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1)
    rid = await generation.create_request(store, world_id, sessions[0], "k", {})
    with pytest.raises(generation.RequestStateError, match=f"generation request {rid} is pending"):
        await generation.complete_request(store, rid, "succeeded")
    with pytest.raises(ValueError, match="status: expected one of succeeded, failed"):
        await generation.complete_request(store, rid, "done")
    with pytest.raises(generation.RequestNotFoundError, match="generation request 424242 does not exist"):
        await generation.complete_request(store, 424242, "succeeded")
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 1.0)
    done = await generation.complete_request(store, rid, "succeeded")
    assert done.status == "succeeded" and done.finished_at is not None
    with pytest.raises(generation.RequestStateError, match="is succeeded"):
        await generation.complete_request(store, rid, "failed")
    other = await generation.create_request(store, world_id, sessions[0], "k", {})
    assert (await generation.cancel_request(store, other)).status == "cancelled"
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 0
    assert [r.id for r in await generation.list_requests(store, status="cancelled")] == [other]


async def test_paused_world_hands_out_nothing_new(store: Store) -> None:
    world_id, sessions = await world_with_users(store, 1, {"pauseSimulation": True})
    await generation.create_request(store, world_id, sessions[0], "k", {})
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    assert (await sched.tick_world(world_id, 1.0)).jobs_enqueued == 0
    assert [r.status for r in await generation.list_requests(store, world_id=world_id)] == ["pending"]


async def test_tick_timeout_during_hand_off_keeps_world_time_exact(store: Store) -> None:
    """The runner's tick timeout fires in the post-commit hand-off: the committed interval is not counted twice."""
    world_id, sessions = await world_with_users(store, 1, {"timeScale": 60, "maxCatchUpSeconds": 600})
    rid = await generation.create_request(store, world_id, sessions[0], "k", {})
    hang = asyncio.Event()

    async def hanging_sink(request: generation.GenerationRequest) -> None:
        await hang.wait()

    clock = VirtualClock()
    # A sink stage longer than the tick timeout (the settings forbid it; a slow database can still get there).
    runner = SchedulerLoopRunner(
        WorldScheduler(store, sink=hanging_sink, sink_timeout_seconds=60),
        store,
        clock=clock,
        limits=RunnerLimits(tick_timeout_seconds=0.3),
    )
    await runner.add_world(world_id)
    await runner.run_until(1.0)  # commits world time 60, then times out in the hand-off
    assert runner.ticks_failed == 1
    assert (await generation.get_request(store, rid)).handed_off is False  # still in the outbox
    hang.set()
    await runner.run_until(5.0)  # backoff, then ticks again and drains the outbox
    ctx = runner.scheduler.get_context(world_id)
    assert ctx.current_world_time == pytest.approx(clock.now() * 60)  # never ahead of real time x scale
    assert (await generation.get_request(store, rid)).handed_off is True


async def test_batch_timeout_during_hand_off_keeps_every_world_time_exact(store: Store) -> None:
    """Two worlds ticked as one batch time out in the shared hand-off: neither counts its interval twice."""
    worlds = [await world_with_users(store, 1, {"timeScale": 60, "maxCatchUpSeconds": 600}) for _ in range(2)]
    rids = [await generation.create_request(store, w, s[0], "k", {}) for w, s in worlds]
    hang = asyncio.Event()
    groups: list[int] = []

    async def hanging_sink(request: generation.GenerationRequest) -> None:
        await hang.wait()

    class GroupSizes(WorldScheduler):
        async def tick_worlds(
            self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None
        ) -> list[TickResult | BaseException]:
            groups.append(len(requests))
            return await super().tick_worlds(requests, wall_at=wall_at)

    clock = VirtualClock()
    runner = SchedulerLoopRunner(
        GroupSizes(store, sink=hanging_sink, sink_timeout_seconds=60),
        store,
        clock=clock,
        limits=RunnerLimits(tick_timeout_seconds=0.3),
    )
    for w, _ in worlds:
        await runner.add_world(w)
    await runner.run_until(1.0)  # one batch of both commits world time 60, then times out in the hand-off
    assert groups[0] == 2
    assert runner.ticks_failed >= 1
    hang.set()
    await runner.run_until(5.0)
    for w, _ in worlds:
        ctx = runner.scheduler.get_context(w)
        assert ctx.current_world_time == pytest.approx(clock.now() * 60)  # never ahead of real time x scale
    for rid in rids:
        assert (await generation.get_request(store, rid)).handed_off
