"""Scheduler core without a database: N worlds at 1 Hz with a no-op tick.

Three implementations carry the same load on the real monotonic clock, each in
its own fresh interpreter (``python -m bench.core --impl …``), so one cannot
inherit another's heap or garbage:

* ``runner``: the real :class:`~scheduler_daemon.runner.SchedulerLoopRunner`
  driving a :class:`NoopScheduler` (a ``WorldScheduler`` whose tick does no I/O).
* ``apscheduler``: APScheduler 3.11 ``AsyncIOScheduler`` with one interval job per world.
* ``floor``: a bare asyncio loop over a heap of deadlines, the floor for Python.

Worlds are spread evenly over the interval (world ``i`` is first due at
``start + 1 + i/N`` s), the same for all three. Measured over the window after
a warm-up: CPU seconds per 1,000 ticks, tick lag p50/p99/max (start of the
tick minus its deadline), and missed (skipped) ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any

from bench.common import cpu_seconds, lag_summary, progress, rss_mib

INTERVAL = 1.0


class _Window:
    """Collects lags and tick counts only inside the measurement window."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.lags = array("d")
        self.ticks = 0
        self.missed = 0
        self.warmup = warmup
        self.seconds = seconds
        self.measuring = False
        self.cpu0 = 0.0
        self.cpu = 0.0

    async def run(self) -> None:
        await asyncio.sleep(self.warmup)
        self.cpu0 = cpu_seconds()
        self.measuring = True
        await asyncio.sleep(self.seconds)
        self.measuring = False
        self.cpu = cpu_seconds() - self.cpu0

    def result(self, impl: str, worlds: int) -> dict[str, Any]:
        scheduled = self.ticks + self.missed
        return {
            "impl": impl,
            "worlds": worlds,
            "seconds": self.seconds,
            "ticks": self.ticks,
            "missed_ticks": self.missed,
            "cpu_seconds": self.cpu,
            "cpu_core_fraction": self.cpu / self.seconds,
            # Per scheduled tick (run or missed): an implementation that falls
            # behind and skips ticks must not look cheaper per tick it ran.
            "cpu_s_per_1000_ticks": self.cpu / scheduled * 1000.0 if scheduled else math.inf,
            **lag_summary(self.lags),
            "rss_mib": rss_mib(),
        }


# ------------------------------------------------------------------- floor
async def run_floor(worlds: int, warmup: float, seconds: float) -> dict[str, Any]:
    """A bare heap of deadlines: pop what is due, await a no-op tick, push the next deadline."""
    window = _Window(warmup, seconds)
    start = time.monotonic() + INTERVAL
    heap = [(start + i * INTERVAL / worlds, i) for i in range(worlds)]
    heapq.heapify(heap)

    async def tick(world: int) -> None:
        return None

    waiter = asyncio.ensure_future(window.run())
    monotonic = time.monotonic
    while not waiter.done():
        now = monotonic()
        while heap[0][0] <= now:
            deadline, world = heap[0]
            started = monotonic()
            await tick(world)
            nxt = deadline + INTERVAL
            if nxt <= started:  # serve the latest started slot, skip the rest
                skipped = math.floor((started - deadline) / INTERVAL)
                nxt = deadline + (skipped + 1) * INTERVAL
                if window.measuring:
                    window.missed += skipped
            heapq.heapreplace(heap, (nxt, world))
            if window.measuring:
                window.lags.append(started - deadline)
                window.ticks += 1
        await asyncio.sleep(max(heap[0][0] - monotonic(), 0.0))
    return window.result("floor", worlds)


# ------------------------------------------------------------- apscheduler
async def run_apscheduler(worlds: int, warmup: float, seconds: float) -> dict[str, Any]:
    """One APScheduler interval job per world (``AsyncIOScheduler``, coroutine jobs)."""
    from datetime import UTC, datetime, timedelta

    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    logging.getLogger("apscheduler").setLevel(logging.CRITICAL)  # shutdown cancels running jobs noisily
    window = _Window(warmup, seconds)
    scheduler = AsyncIOScheduler(timezone=UTC)
    # Adding jobs takes a while; the first deadlines must not have passed by the time it is done.
    start_wall = datetime.now(UTC) + timedelta(seconds=INTERVAL + worlds / 1000)
    start_epoch = start_wall.timestamp()
    wall = time.time

    async def job(world: int) -> None:
        # APScheduler schedules on wall time; the deadline of the run in
        # progress is the latest grid point at or before now.
        now = wall()
        first = start_epoch + world * INTERVAL / worlds
        lag = (now - first) % INTERVAL
        if window.measuring:
            window.lags.append(lag)
            window.ticks += 1

    def on_missed(event: JobEvent) -> None:
        if window.measuring:
            window.missed += 1

    scheduler.add_listener(on_missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
    for i in range(worlds):
        scheduler.add_job(
            job,
            IntervalTrigger(seconds=INTERVAL, start_date=start_wall + timedelta(seconds=i * INTERVAL / worlds)),
            args=[i],
            id=str(i),
            coalesce=True,
            misfire_grace_time=int(INTERVAL),
            max_instances=1,
        )
    scheduler.start()
    try:
        # The window starts once the first deadlines are reached, as for the others.
        await asyncio.sleep(max(start_epoch - wall(), 0.0))
        await window.run()
    finally:
        scheduler.shutdown(wait=False)
    return window.result("apscheduler", worlds)


# ------------------------------------------------------------------ runner
async def run_runner(worlds: int, warmup: float, seconds: float) -> dict[str, Any]:
    """The real SchedulerLoopRunner over a scheduler whose tick does no I/O."""
    from bench.noop import NoopScheduler
    from scheduler_daemon import collector
    from scheduler_daemon.logs import configure_logging
    from scheduler_daemon.runner import SchedulerLoopRunner

    configure_logging("WARNING", "json")
    window = _Window(warmup, seconds)

    class Observer:
        def tick_finished(self, world_id: int, outcome: str, lag: float, duration: float, result: object) -> None:
            if window.measuring:
                # Deviation from the deadline: a tick coalesced ahead of it counts as much as a late one.
                window.lags.append(abs(lag))
                window.ticks += 1

        def ticks_missed(self, world_id: int, slots: int) -> None:
            if window.measuring:
                window.missed += slots

        def world_registered(self, world_id: int) -> None:
            return None

        def world_unregistered(self, world_id: int) -> None:
            return None

    scheduler = NoopScheduler()
    runner = SchedulerLoopRunner(scheduler, scheduler.noop_store, observer=Observer())
    # Registering takes a while; the first deadlines must not have passed by the time it is done.
    start = runner.clock.now() + INTERVAL + worlds / 5000
    for i in range(worlds):
        await runner.add_world(i + 1, first_deadline=start + i * INTERVAL / worlds)
    # As the daemon does once ready: startup's objects out of the collector's way.
    collector.settle()
    loop_task = asyncio.create_task(runner.start())
    try:
        await asyncio.sleep(max(start - runner.clock.now(), 0.0))
        await window.run()
    finally:
        runner.stop()
        await loop_task
    return window.result("runner", worlds)


IMPLS = {"floor": run_floor, "apscheduler": run_apscheduler, "runner": run_runner}


def run_in_subprocess(impl: str, worlds: int, warmup: float, seconds: float) -> dict[str, Any]:
    """Run one implementation in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, "-m", "bench.core", "--impl", impl, "--worlds", str(worlds)]
    cmd += ["--warmup", str(warmup), "--seconds", str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=warmup + seconds + 300)
    return dict(json.loads(out.stdout))


def run_core(
    world_counts: Sequence[int], warmup: float, seconds: float, *, isolate: bool = True, repeats: int = 1
) -> dict[str, Any]:
    """All implementations at each world count; ratios at the largest count.

    At the largest count the floor and the runner run ``repeats`` times,
    alternating, and the ratio to the floor is the median of the pairs: on a
    shared 2-core VM one 6-second run of either moves by ±25 %.
    ``isolate=False`` runs them in this interpreter (the micro smoke run: no
    interpreter start-ups, figures not comparable).
    """
    rows: list[dict[str, Any]] = []
    top = max(world_counts)
    for worlds in world_counts:
        for repeat in range(repeats if worlds == top else 1):
            for impl in ("floor", "apscheduler", "runner") if repeat == 0 else ("floor", "runner"):
                progress(f"core: {impl} with {worlds} worlds for {seconds:g} s (+{warmup:g} s warm-up)")
                if isolate:
                    row = run_in_subprocess(impl, worlds, warmup, seconds)
                else:
                    row = asyncio.run(IMPLS[impl](worlds, warmup, seconds))
                row["repeat"] = repeat
                progress(
                    f"core: {impl}: {row['cpu_core_fraction'] * 100:.1f}% of a core, "
                    f"p99 lag {row['p99_lag_ms']:.2f} ms, missed {row['missed_ticks']}"
                )
                rows.append(row)

    def at_top(impl: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["worlds"] == top and r["impl"] == impl]

    cpu = "cpu_s_per_1000_ticks"
    floors, ours, (aps,) = at_top("floor"), at_top("runner"), at_top("apscheduler")
    return {
        "worlds": top,
        "repeats": len(ours),
        "cpu_ratio_vs_floor": statistics.median(r[cpu] / f[cpu] for r, f in zip(ours, floors, strict=True)),
        "cpu_ratio_vs_apscheduler": statistics.median(r[cpu] for r in ours) / aps[cpu],
        "p99_lag_ms": statistics.median(r["p99_lag_ms"] for r in ours),
        "missed_ticks": max(r["missed_ticks"] for r in ours),
        "runs": rows,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=sorted(IMPLS), required=True)
    parser.add_argument("--worlds", type=int, default=10_000)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    result = asyncio.run(IMPLS[args.impl](args.worlds, args.warmup, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
