"""The sustained world count: bisection over short probe windows, then one long confirming window.

A world count W is *sustained* when the daemon ticking W worlds at 1 Hz has
p99 tick lag under 100 ms and no missed or failed tick over the window. The
search runs short probes to bracket W (doubling up from a start until a probe
fails, halving down if the start fails; a hinted upper end, expected to fail,
stands in for the doubling probe and is probed only if the bisection narrows
up to it, then doubling resumes if it passes), narrows the bracket by bisection
until it is within ``resolution`` of the largest passing count, then runs ONE
window of ``confirm_seconds`` at that count (``confirm_margin`` below it); if
the confirmation fails it steps down by ``resolution`` and confirms again, at
most ``max_confirms`` times.

``budget_seconds`` bounds the search's wall time: a probe runs only if it and
one confirming window still fit, a further confirmation only if it fits (the
first probe and the first confirmation always run). A window's cost is
estimated from the overhead (start-up, registration, warm-up) of the windows
before it. Every window is kept (``runs``) for the lag plot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

P99_LIMIT_MS = 100.0
FIRST_OVERHEAD_SECONDS = 5.0  # the cost estimate of a window beyond its length, before one has run


@dataclass(frozen=True)
class SearchPlan:
    """Bounds and windows of one search."""

    start: int
    maximum: int
    probe_seconds: float
    confirm_seconds: float
    resolution: float = 0.1  # stop bisecting once (hi - lo) / lo <= resolution
    max_probes: int = 8
    max_confirms: int = 2
    budget_seconds: float = math.inf
    # The first confirmation runs this fraction below the largest passing probe: a budget with
    # no room for a second confirmation should not end at 0 on a 60 s window a short probe passed.
    confirm_margin: float = 0.0
    # A count expected to fail (from the flat-out throughput): the first bracket's upper end,
    # probed only if the bisection narrows up to it. None: double until a probe fails.
    upper_hint: int | None = None


def sustained(row: dict[str, Any]) -> bool:
    """The definition: p99 lag under 100 ms, no missed and no failed tick."""
    return bool(row["p99_lag_ms"] < P99_LIMIT_MS and row["missed_ticks"] == 0 and row["failed_ticks"] == 0)


def search(
    window: Callable[[int, float, str], dict[str, Any]],
    plan: SearchPlan,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Find the sustained world count; ``window(worlds, seconds, kind)`` runs one measurement window.

    Returns ``sustained_worlds`` (0 when no count was confirmed), the
    confirming row (``confirmed``, or None) and every window run (``runs``).
    """
    runs: list[dict[str, Any]] = []
    started = clock()
    overhead = FIRST_OVERHEAD_SECONDS
    cut_by_budget = False

    def run(worlds: int, seconds: float, kind: str) -> bool:
        nonlocal overhead
        t0 = clock()
        row = window(worlds, seconds, kind)
        wall = clock() - t0
        beyond = max(wall - row["seconds"], 0.0)
        overhead = beyond if not runs else max(overhead, beyond)
        row.update(worlds=worlds, kind=kind, sustained=sustained(row), wall_seconds=wall)
        runs.append(row)
        return bool(row["sustained"])

    def fits(*seconds: float) -> bool:
        nonlocal cut_by_budget
        if clock() - started + sum(s + overhead for s in seconds) <= plan.budget_seconds:
            return True
        cut_by_budget = True
        return False

    def may_probe() -> bool:
        return probes < plan.max_probes and (not runs or fits(plan.probe_seconds, plan.confirm_seconds))

    lo, hi, hi_tried, hint_taken = 0, None, False, False  # largest passing, smallest failing (or hinted) count
    first = worlds = min(max(plan.start, 1), plan.maximum)
    probes = 0

    def next_count() -> int | None:
        if not lo:  # nothing passed yet: halve down
            return None if hi == 1 else max((hi or 2) // 2, 1)
        if hi is None:  # nothing failed yet: double up
            return None if lo >= plan.maximum else min(lo * 2, plan.maximum)
        if hi - lo > max(1, plan.resolution * lo):
            return (lo + hi) // 2
        return None if hi_tried else hi  # narrowed up to the hint: try the hint itself

    next_worlds: int | None = worlds
    while next_worlds is not None and may_probe():
        worlds, probes = next_worlds, probes + 1
        if run(worlds, plan.probe_seconds, "probe"):
            lo = worlds
            if worlds == hi:
                hi = None  # the hint passed: keep doubling
            if hi is None and not hint_taken and plan.upper_hint is not None and plan.upper_hint > lo:
                # Expected to fail, so tried only if the bisection gets that far.
                hi, hi_tried, hint_taken = min(plan.upper_hint, plan.maximum), False, True
        else:
            hi, hi_tried = worlds, True
        next_worlds = next_count()
    candidate = max(math.floor(lo * (1 - plan.confirm_margin)), 1) if lo else 0
    confirmed, confirms = None, 0
    while candidate >= 1 and confirms < plan.max_confirms and (confirms == 0 or fits(plan.confirm_seconds)):
        confirms += 1
        if run(candidate, plan.confirm_seconds, "confirm"):
            confirmed = runs[-1]
            break
        candidate = min(math.floor(candidate * (1 - plan.resolution)), candidate - 1)
    return {
        "sustained_worlds": confirmed["worlds"] if confirmed else 0,
        "best_probe_worlds": lo,
        "smallest_failed_probe_worlds": hi if hi_tried else None,
        "upper_hint": plan.upper_hint,
        "probe_seconds": plan.probe_seconds,
        "confirm_seconds": plan.confirm_seconds,
        "search_range": [first, plan.maximum],
        "resolution": plan.resolution,
        "budget_seconds": plan.budget_seconds if math.isfinite(plan.budget_seconds) else None,
        "cut_by_budget": cut_by_budget,
        "search_seconds": clock() - started,
        "confirmed": confirmed,
        "runs": runs,
    }
