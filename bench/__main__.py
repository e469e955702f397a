"""Run the benchmark suite and write JSON, a Markdown table and a PNG plot.

``python -m bench`` (full, ``make bench``), ``python -m bench --quick``
(``make bench-quick``, under 6 minutes), ``python -m bench --micro`` (seconds;
the test suite's smoke run). PostgreSQL comes from ``--postgres-url`` or
``SCHEDULER_TEST_POSTGRES_URL``; without it the PostgreSQL part is skipped and
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import core, e2e, startup
from bench.common import progress
from bench.report import write_markdown, write_plot
from bench.sustain import SearchPlan


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one run mode."""

    name: str
    core_worlds: tuple[int, ...]
    core_warmup: float
    core_seconds: float
    e2e_saturate_worlds: int
    e2e_warmup: float  # before every end-to-end window
    e2e_seconds: float  # flat-out windows
    sqlite_saturate_worlds: int
    probe_seconds: float  # sustained search: bracketing and bisecting windows
    confirm_seconds: float  # sustained search: the one confirming window
    pg_max_worlds: int
    sqlite_max_worlds: int
    resolution: float
    max_probes: int
    max_confirms: int
    confirm_margin: float  # the first confirmation this fraction below the largest passing probe
    search_budget_seconds: tuple[float, float]  # PostgreSQL, SQLite (see bench/sustain.py)
    startup_worlds: int  # time to READY=1 and RSS of the real daemon, both backends
    startup_settle: float
    parts: str  # what runs without --only
    #: The earlier issues' hand-written comparison programs (naive ORM, raw floor and ceiling); quick leaves
    #: them out so the sustained searches get the time.
    comparisons: bool = True


INF = float("inf")
PROFILES = {
    "full": Profile(
        "full",
        core_worlds=(1_000, 10_000),
        core_warmup=3.0,
        core_seconds=30.0,
        e2e_saturate_worlds=256,
        e2e_warmup=3.0,
        e2e_seconds=20.0,
        sqlite_saturate_worlds=64,
        probe_seconds=20.0,
        confirm_seconds=60.0,
        pg_max_worlds=1024,
        sqlite_max_worlds=256,
        resolution=0.05,
        max_probes=10,
        max_confirms=3,
        confirm_margin=0.0,
        search_budget_seconds=(INF, INF),
        startup_worlds=10_000,
        startup_settle=30.0,
        parts="core,pg,sqlite,startup",
    ),
    # Under 6 minutes on a 2-core machine: the searches are bounded by their budgets, start-up is left out.
    "quick": Profile(
        "quick",
        core_worlds=(10_000,),
        core_warmup=1.0,
        core_seconds=4.0,
        e2e_saturate_worlds=64,
        e2e_warmup=1.0,
        # Client CPU per decision moved ±25 % between 3 s windows on the shared 2-core VM: longer windows average it.
        e2e_seconds=8.0,
        sqlite_saturate_worlds=16,
        probe_seconds=6.0,
        confirm_seconds=60.0,
        pg_max_worlds=1024,
        sqlite_max_worlds=256,
        resolution=0.1,
        max_probes=7,
        max_confirms=2,
        confirm_margin=0.1,  # the budget seldom has room for a second confirmation
        search_budget_seconds=(150.0, 140.0),
        startup_worlds=2_000,
        startup_settle=10.0,
        parts="core,pg,sqlite",
        comparisons=False,
    ),
    "micro": Profile(
        "micro",
        core_worlds=(200,),
        core_warmup=0.3,
        core_seconds=1.0,
        e2e_saturate_worlds=4,
        e2e_warmup=0.3,
        e2e_seconds=1.0,
        sqlite_saturate_worlds=4,
        probe_seconds=1.0,
        confirm_seconds=1.0,
        pg_max_worlds=4,
        sqlite_max_worlds=4,
        resolution=0.5,
        max_probes=2,
        max_confirms=1,
        confirm_margin=0.0,
        search_budget_seconds=(INF, INF),
        startup_worlds=20,
        startup_settle=1.0,
        parts="core,pg,sqlite",
    ),
}

CONCURRENCY = 8  # daemon batch workers = raw implementations' connections
GROUP = 64  # worlds per transaction of the raw ceiling (= the daemon's max_batch_size)


def plan(profile: Profile, start: int, maximum: int, budget: float) -> SearchPlan:
    """The sustained search of one backend under ``profile`` (``start`` 0: from the flat-out run)."""
    return SearchPlan(
        start=start,
        maximum=maximum,
        probe_seconds=profile.probe_seconds,
        confirm_seconds=profile.confirm_seconds,
        resolution=profile.resolution,
        max_probes=profile.max_probes,
        max_confirms=profile.max_confirms,
        confirm_margin=profile.confirm_margin,
        budget_seconds=budget,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows, under 6 minutes")
    mode.add_argument("--micro", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument(
        "--only", help="comma list of core, pg, sqlite, startup (default: all; --quick and --micro leave out startup)"
    )
    parser.add_argument("--postgres-url", default=os.environ.get("SCHEDULER_TEST_POSTGRES_URL"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    for backend in ("pg", "sqlite"):
        parser.add_argument(
            f"--{backend}-start-worlds",
            type=int,
            default=0,
            help="first world count of the sustained search (default: from the flat-out throughput)",
        )
        parser.add_argument(f"--{backend}-max-worlds", type=int, help="largest world count the search tries")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "micro" if args.micro else "full"]
    only = {p.strip() for p in (args.only or profile.parts).split(",") if p.strip()}
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": profile.name,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg()),
        },
    }
    if "core" in only:
        results["core"] = core.run_core(
            profile.core_worlds,
            profile.core_warmup,
            profile.core_seconds,
            isolate=profile.name != "micro",
            repeats=1 if profile.name == "micro" else 3,
        )
    if "pg" in only:
        if args.postgres_url:
            results["e2e_pg"] = e2e.run_backend(
                "postgresql",
                server_url=args.postgres_url,
                saturate_worlds=profile.e2e_saturate_worlds,
                plan=plan(
                    profile,
                    args.pg_start_worlds,
                    args.pg_max_worlds or profile.pg_max_worlds,
                    profile.search_budget_seconds[0],
                ),
                warmup=profile.e2e_warmup,
                seconds=profile.e2e_seconds,
                concurrency=CONCURRENCY,
                group=GROUP,
                impls=(
                    "daemon",
                    "db_ceiling",
                    *(("naive_orm", "raw_floor", "raw_ceiling") if profile.comparisons else ()),
                ),
                isolate=profile.name != "micro",
            )
        else:
            progress("e2e postgresql skipped: set SCHEDULER_TEST_POSTGRES_URL or --postgres-url")
            results["e2e_pg"] = {"skipped": "no PostgreSQL URL"}
    if "sqlite" in only:
        results["e2e_sqlite"] = e2e.run_backend(
            "sqlite",
            server_url=None,
            saturate_worlds=profile.sqlite_saturate_worlds,
            plan=plan(
                profile,
                args.sqlite_start_worlds,
                args.sqlite_max_worlds or profile.sqlite_max_worlds,
                profile.search_budget_seconds[1],
            ),
            warmup=profile.e2e_warmup,
            seconds=profile.e2e_seconds,
            concurrency=1,  # SQLite has one writer
            group=GROUP,
            impls=("daemon", *(("naive_orm",) if profile.comparisons else ())),
            isolate=profile.name != "micro",
        )
    if "startup" in only:
        results["startup"] = startup.run(
            ["sqlite", "postgresql"],
            profile.startup_worlds,
            postgres_url=args.postgres_url,
            settle_seconds=profile.startup_settle,
        )
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["elapsed_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{profile.name}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    table = write_markdown(results, args.out / f"{profile.name}.md")
    plot = write_plot(results, args.out / f"{profile.name}-lag.png")
    print(table)
    progress(f"wrote {json_path}, {args.out / (profile.name + '.md')}" + (f", {plot}" if plot else ""))
    progress(f"done in {results['elapsed_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
