"""World clock semantics on the pure context (no database, no sleeping)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler_daemon.context import WorldSimulationContext, format_world_time
from scheduler_daemon.world_config import parse_world_config


def ctx(**sim: object) -> WorldSimulationContext:
    return WorldSimulationContext(1, parse_world_config(sim))


def advance(c: WorldSimulationContext, delta_real_seconds: float) -> float:
    """A tick without simulation work (plan, then apply, as the scheduler does around its commit)."""
    plan = c.plan_advance(delta_real_seconds)
    c.apply_tick(plan)
    return plan.delta_game_seconds


def test_world_time_tracks_real_time_over_10000_ticks() -> None:
    c = ctx(timeScale=60)
    total_real = 0.0
    for i in range(10_000):
        delta = 0.9 + (i % 7) * 0.03  # jittery intervals
        advance(c, delta)
        total_real += delta
    assert c.ticks_processed == 10_000
    assert math.isclose(c.current_world_time, total_real * 60, rel_tol=1e-12)


def test_late_tick_covers_the_real_elapsed_time() -> None:
    c = ctx(timeScale=60, tickIntervalSeconds=1.0)
    advance(c, 1.0)
    assert advance(c, 2.7) == pytest.approx(2.7 * 60)
    assert c.current_world_time == pytest.approx(3.7 * 60)


def test_catch_up_cap_limits_a_stall() -> None:
    c = ctx(timeScale=3600, maxCatchUpSeconds=5)
    plan = c.plan_advance(3600.0)  # an hour-long stall
    assert plan.capped
    assert plan.delta_game_seconds == pytest.approx(5 * 3600)


def test_pause_freezes_and_resume_does_not_jump() -> None:
    c = ctx(timeScale=60)
    advance(c, 1.0)
    paused = parse_world_config({"timeScale": 60, "pauseSimulation": True})
    c.update_config(paused, elapsed_real_since_tick=0.5)  # paused half-way through an interval
    assert advance(c, 1.0) == pytest.approx(0.5 * 60)  # only the part before the pause
    for _ in range(100):
        assert advance(c, 1.0) == 0.0
    frozen = c.current_world_time
    c.update_config(parse_world_config({"timeScale": 60}), elapsed_real_since_tick=0.75)
    # Resumed 0.25 s before the next tick: only that quarter second counts.
    assert advance(c, 1.0) == pytest.approx(0.25 * 60)
    assert c.current_world_time == pytest.approx(frozen + 15)


def test_time_scale_change_mid_interval_accrues_old_scale_first() -> None:
    c = ctx(timeScale=60)
    c.update_config(parse_world_config({"timeScale": 120}), elapsed_real_since_tick=0.4)
    assert advance(c, 1.0) == pytest.approx(0.4 * 60 + 0.6 * 120)
    assert advance(c, 1.0) == pytest.approx(120)  # then the new scale only


def test_two_changes_in_one_interval() -> None:
    c = ctx(timeScale=10)
    c.update_config(parse_world_config({"timeScale": 20}), elapsed_real_since_tick=0.2)
    c.update_config(parse_world_config({"timeScale": 40}), elapsed_real_since_tick=0.5)
    assert advance(c, 1.0) == pytest.approx(0.2 * 10 + 0.3 * 20 + 0.5 * 40)


def test_failed_tick_leaves_clock_untouched_and_next_tick_covers_it() -> None:
    c = ctx(timeScale=60)
    advance(c, 1.0)
    before = (c.current_world_time, c.ticks_processed)
    c.plan_advance(1.0)  # planned, then the commit failed
    c.record_failure("boom")
    assert (c.current_world_time, c.ticks_processed) == before
    assert c.state == "failing"
    advance(c, 2.0)  # the next tick covers both intervals
    assert c.current_world_time == pytest.approx(180)
    assert c.state == "running" and c.last_error is None


def test_stale_plan_is_refused() -> None:
    c = ctx()
    plan = c.plan_advance(1.0)
    advance(c, 1.0)
    with pytest.raises(RuntimeError, match="stale tick plan"):
        c.apply_tick(plan)


def test_negative_delta_is_rejected() -> None:
    with pytest.raises(ValueError):
        ctx().plan_advance(-0.1)


@given(
    deltas=st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=50),
    scale=st.floats(min_value=0.001, max_value=86400, allow_nan=False),
    cap=st.floats(min_value=1, max_value=120, allow_nan=False),
)
def test_world_time_is_sum_of_capped_deltas(deltas: list[float], scale: float, cap: float) -> None:
    c = ctx(timeScale=scale, maxCatchUpSeconds=cap)
    for d in deltas:
        advance(c, d)
    expected = sum(min(d, cap) for d in deltas) * scale
    assert math.isclose(c.current_world_time, expected, rel_tol=1e-9, abs_tol=1e-9)


def test_stats_have_the_documented_keys() -> None:
    stats = ctx().get_stats()
    for key in (
        "world_id",
        "current_world_time",
        "ticks_processed",
        "ticks_skipped",
        "npcs_simulated_last_tick",
        "jobs_enqueued_last_tick",
        "npcs_per_tier",
        "last_tick_duration_ms",
        "average_tick_duration_ms",
        "last_error",
        "config",
    ):
        assert key in stats
    assert stats["config"]["timeScale"] == 60


def test_format_world_time() -> None:
    assert format_world_time(0) == "day 1 Mon 00:00"
    assert format_world_time(86400 * 2 + 8 * 3600 + 30 * 60) == "day 3 Wed 08:30"


def test_resync_adopts_a_failed_tick_that_did_commit() -> None:
    """A tick reported failed (timeout, disconnect in COMMIT) may have committed: find it on resync."""
    c = WorldSimulationContext(1, parse_world_config({"timeScale": 60}), world_time=100.0, ticks=4)
    first = c.plan_advance(1.5)
    c.record_failure("TimeoutError")
    c.record_unconfirmed(first)  # committed after all: the database is at first.world_time_after
    second = c.plan_advance(2.5)  # retried later from the same base, failed for real
    c.record_unconfirmed(second)
    c.resync(first.world_time_after, 5)
    assert c.adopted_real_seconds == 1.5
    assert (c.current_world_time, c.ticks_processed) == (first.world_time_after, 5)
    # Moved by someone else: nothing of ours to adopt.
    c.record_unconfirmed(c.plan_advance(1.0))
    c.resync(999.0, 9)
    assert c.adopted_real_seconds == 0.0
