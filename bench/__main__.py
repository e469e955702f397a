"""Run the benchmark suite and write JSON, a Markdown table and a PNG plot.

``python -m bench`` (full, ``make bench``), ``python -m bench --quick``
(``make bench-quick``, under 3 minutes), ``python -m bench --micro`` (seconds;
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


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one run mode."""

    name: str
    core_worlds: tuple[int, ...]
    core_warmup: float
    core_seconds: float
    e2e_saturate_worlds: int
    e2e_sustain_worlds: tuple[int, ...]
    e2e_warmup: float
    e2e_seconds: float
    sqlite_saturate_worlds: int
    startup_worlds: int  # time to READY=1 and RSS of the real daemon, both backends
    startup_settle: float


PROFILES = {
    "full": Profile(
        "full", (1_000, 10_000), 3.0, 30.0, 256, (32, 64, 125, 250, 500, 1000, 2000), 3.0, 20.0, 64, 10_000, 30.0
    ),
    "quick": Profile("quick", (10_000,), 1.5, 6.0, 64, (16, 32, 64), 1.0, 4.0, 16, 2_000, 10.0),
    "micro": Profile("micro", (200,), 0.3, 1.0, 4, (4,), 0.3, 1.0, 4, 20, 1.0),
}

CONCURRENCY = 8  # daemon batch workers = raw implementations' connections
GROUP = 64  # worlds per transaction of the raw ceiling (= the daemon's max_batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, same ratios, under 3 minutes")
    mode.add_argument("--micro", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--only", default="core,pg,sqlite,startup", help="comma list of core, pg, sqlite, startup")
    parser.add_argument("--postgres-url", default=os.environ.get("SCHEDULER_TEST_POSTGRES_URL"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "micro" if args.micro else "full"]
    only = {p.strip() for p in args.only.split(",") if p.strip()}
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
                sustain_worlds=profile.e2e_sustain_worlds,
                warmup=profile.e2e_warmup,
                seconds=profile.e2e_seconds,
                concurrency=CONCURRENCY,
                group=GROUP,
                impls=("daemon", "naive_orm", "raw_floor", "raw_ceiling"),
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
            sustain_worlds=profile.e2e_sustain_worlds[:1],
            warmup=profile.e2e_warmup,
            seconds=profile.e2e_seconds,
            concurrency=1,  # SQLite has one writer
            group=GROUP,
            impls=("daemon", "naive_orm"),
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
