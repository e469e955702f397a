"""The pure core of generation claims and chains: properties over many inputs, no database."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_daemon.simulation import chains as ch
from scheduler_daemon.simulation import generation as gen

users = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=100, deadline=None)
@given(
    candidates=st.lists(users, max_size=40),
    budget=st.integers(0, 15),
    cap=st.integers(0, 5),
    start=st.dictionaries(users, st.integers(0, 6)),
)
def test_plan_claims_respects_budget_caps_and_order(
    candidates: list[str], budget: int, cap: int, start: dict[str, int]
) -> None:
    cands = [gen.Candidate(i, u) for i, u in enumerate(candidates)]
    plan = gen.plan_claims(cands, budget=budget, in_flight_per_user=start, per_user_cap=cap)
    assert len(plan.claim) <= budget
    assert plan.claim == sorted(plan.claim)  # the store's order is kept
    for user in "abcd":
        new = sum(1 for i in plan.claim if cands[i].user_id == user)
        assert plan.in_flight_per_user.get(user, 0) == start.get(user, 0) + new
        assert new == 0 or start.get(user, 0) + new <= cap
    # Greedy: a considered candidate was skipped only because its user was at the cap.
    taken = set(plan.claim)
    counts = dict(start)
    for c in cands[: plan.considered]:
        if c.id in taken:
            counts[c.user_id] = counts.get(c.user_id, 0) + 1
        else:
            assert counts.get(c.user_id, 0) >= cap
    assert plan.considered == len(cands) or len(plan.claim) == budget


def test_split_broken_keeps_order_and_names_the_field() -> None:
    ok, broken = gen.split_broken([(1, "k", {}), (2, "k", [1]), (3, "", {}), (4, "k", {"a": 1})])
    assert ok == [1, 4]
    assert [rid for rid, _ in broken] == [2, 3]
    assert "payload: expected a JSON object" in broken[0][1] and "kind" in broken[1][1]


def test_claim_budget_and_backoff() -> None:
    assert gen.claim_budget(10, 20, 15) == 5
    assert gen.claim_budget(10, 20, 25) == 0
    assert gen.claim_budget(10, 100, 0) == 10
    assert [gen.backoff_seconds(n, 5) for n in (1, 2, 3)] == [5, 10, 20]
    assert gen.backoff_seconds(40, 5) == gen.MAX_BACKOFF_SECONDS
    d = gen.retry_after_failure(0, max_attempts=3, backoff_base_seconds=5, time_scale=60, world_time=100)
    assert (d.attempts, d.failed, d.not_before) == (1, False, 100 + 300)
    assert gen.retry_after_failure(2, max_attempts=3, backoff_base_seconds=5, time_scale=60, world_time=0).failed


@settings(max_examples=100, deadline=None)
@given(
    waits=st.lists(st.floats(0, 5000, allow_nan=False), min_size=1, max_size=12),
    ticks=st.lists(st.floats(0, 20000, allow_nan=False), min_size=1, max_size=10),
    budget=st.integers(1, 5),
)
def test_chain_fires_every_step_once_in_order_at_its_schedule(
    waits: list[float], ticks: list[float], budget: int
) -> None:
    steps = [ch.ChainStep(w, i) for i, w in enumerate(waits)]
    due_times = [sum(waits[: i + 1]) for i in range(len(waits))]
    current, next_at = 0, ch.first_due_at(0.0, steps)
    fired: list[ch.FiredStep] = []
    for now in sorted(ticks) + [sum(waits) + 1.0] * len(waits):  # the last ones drain the rest
        if current >= len(steps):
            break
        adv = ch.advance_chain(1, steps, current, next_at, now, budget)
        assert len(adv.fired) <= budget
        assert all(f.due_at <= now == f.fired_at for f in adv.fired)
        fired += adv.fired
        current = adv.current_step
        next_at = adv.next_step_at if adv.next_step_at is not None else float("inf")
    assert [f.index for f in fired] == list(range(len(steps)))  # never skipped, never twice
    assert [f.due_at for f in fired] == pytest.approx(due_times)  # no drift from late ticks
    assert [f.payload for f in fired] == list(range(len(steps)))


def test_wait_helpers_and_bad_steps() -> None:
    assert ch.wait_minutes(2) == 120 and ch.wait_hours(1.5) == 5400 and ch.wait_days(1) == 86400
    assert ch.wait_seconds(0) == 0.0
    for bad in (-1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ch.ChainError):
            ch.wait_seconds(bad)  # type: ignore[arg-type]
    with pytest.raises(ch.ChainError, match="steps: expected a list"):
        ch.parse_steps("[]")
    with pytest.raises(ch.ChainError, match=r"steps\[0\]: expected an object"):
        ch.parse_steps([5])
    with pytest.raises(ch.ChainError, match="current_step: 3 is outside"):
        ch.advance_chain(1, [ch.ChainStep(1.0)], 3, 0.0, 10.0, 5)


def test_cooldown_is_world_time_arithmetic() -> None:
    assert not ch.on_cooldown(None, 60, 0)
    assert ch.on_cooldown(100, 60, 159.9)
    assert not ch.on_cooldown(100, 60, 160)
    with pytest.raises(ch.ChainError):
        ch.on_cooldown(0, -1, 0)


def test_payload_validation_messages() -> None:
    assert gen.validate_payload({"a": [1, 2.5, None]}) == {"a": [1, 2.5, None]}
    with pytest.raises(gen.GenerationRequestError, match="payload: larger than"):
        gen.validate_payload({"x": "y" * (gen.MAX_PAYLOAD_BYTES + 1)})
    with pytest.raises(gen.GenerationRequestError, match="object keys must be strings"):
        gen.validate_payload({1: 2})
    assert gen.row_problem("k", {}) is None
    assert "kind" in (gen.row_problem(None, {}) or "")
