"""The sustained search of the benchmarks (bench/sustain.py) on a machine whose capacity is known.

The window function stands in for a daemon run: a count passes when it is at
most the capacity (or, for the confirming window, at most a lower one).
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.sustain import SearchPlan, search


class Clock:
    """Wall time that moves only by the windows run (each costs its length plus 5 s)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def machine(
    capacity: int, confirm_capacity: int | None = None, clock: Clock | None = None
) -> tuple[Any, list[tuple[int, str]]]:
    calls: list[tuple[int, str]] = []

    def window(worlds: int, seconds: float, kind: str) -> dict[str, Any]:
        calls.append((worlds, kind))
        if clock is not None:
            clock.now += seconds + 5.0
        limit = confirm_capacity if kind == "confirm" and confirm_capacity is not None else capacity
        late = worlds > limit
        return {"p99_lag_ms": 500.0 if late else 5.0, "missed_ticks": 0, "failed_ticks": 0, "seconds": seconds}

    return window, calls


@pytest.mark.parametrize("capacity", [1, 37, 100, 150, 199, 450, 1024])
@pytest.mark.parametrize("hint", [None, 200])
def test_search_finds_the_capacity_within_the_resolution(capacity: int, hint: int | None) -> None:
    window, calls = machine(capacity)
    plan = SearchPlan(start=100, maximum=1024, probe_seconds=1, confirm_seconds=60, max_probes=20, upper_hint=hint)
    found = search(window, plan)
    assert found["sustained_worlds"] <= capacity
    assert found["sustained_worlds"] >= min(capacity, 1024) / (1 + plan.resolution) - 1
    assert [kind for _, kind in calls].count("confirm") == 1 and calls[-1][1] == "confirm"


def test_a_hint_that_fails_saves_the_doubling_probe() -> None:
    window, calls = machine(150)
    found = search(window, SearchPlan(start=100, maximum=1024, probe_seconds=1, confirm_seconds=60, upper_hint=200))
    assert 200 not in [w for w, _ in calls] and found["smallest_failed_probe_worlds"] != 200
    assert found["sustained_worlds"] >= 137


def test_a_failed_confirmation_steps_down_and_confirms_again() -> None:
    window, calls = machine(150, confirm_capacity=140)
    found = search(window, SearchPlan(start=100, maximum=1024, probe_seconds=1, confirm_seconds=60, max_confirms=3))
    confirms = [w for w, kind in calls if kind == "confirm"]
    assert confirms[0] == found["best_probe_worlds"] and len(confirms) >= 2
    assert found["sustained_worlds"] == confirms[-1] <= 140


def test_nothing_confirmed_is_zero() -> None:
    window, calls = machine(0)
    found = search(window, SearchPlan(start=8, maximum=64, probe_seconds=1, confirm_seconds=60))
    assert found["sustained_worlds"] == 0 and found["confirmed"] is None
    assert [w for w, _ in calls] == [8, 4, 2, 1]


def test_the_budget_keeps_room_for_one_confirmation_and_no_more() -> None:
    clock = Clock()
    window, calls = machine(150, confirm_capacity=100, clock=clock)
    plan = SearchPlan(start=100, maximum=1024, probe_seconds=10, confirm_seconds=60, budget_seconds=130)
    found = search(window, plan, clock)
    # A probe runs while it and the confirmation (65 s) fit: 15 s each, so four of them.
    assert found["cut_by_budget"] and [kind for _, kind in calls] == ["probe"] * 4 + ["confirm"]
    assert found["sustained_worlds"] == 0 and clock.now <= 130


def test_a_confirm_margin_confirms_below_the_largest_passing_probe() -> None:
    window, calls = machine(150, confirm_capacity=140)
    plan = SearchPlan(start=100, maximum=1024, probe_seconds=1, confirm_seconds=60, confirm_margin=0.1)
    found = search(window, plan)
    confirms = [w for w, kind in calls if kind == "confirm"]
    assert confirms == [int(found["best_probe_worlds"] * 0.9)] and found["sustained_worlds"] == confirms[0]
