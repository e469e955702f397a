"""Memory soak: the daemon at a sustained load on PostgreSQL for ten minutes; resident size must grow < 5 %.

``python -m bench.soak [--worlds W] [--minutes M]`` (``make bench-memory``). Seeds W
worlds × 500 NPCs in a fresh database, runs the real runner + scheduler at
1 Hz in a worker process and samples its RSS every ``--sample-seconds``
after a warm-up; growth is measured from the first sample after warm-up to
the last. Exits 1 when growth is 5 % or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import e2e
from bench.common import progress


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--postgres-url", default=os.environ.get("SCHEDULER_TEST_POSTGRES_URL"))
    parser.add_argument("--worlds", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not args.postgres_url:
        parser.error("set SCHEDULER_TEST_POSTGRES_URL or --postgres-url")
    url = e2e.create_pg_database(args.postgres_url)
    try:
        progress(f"soak: seeding {args.worlds} worlds × {e2e.NPCS_PER_WORLD} NPCs")
        asyncio.run(e2e.seed(url, args.worlds))
        seconds = args.minutes * 60.0
        progress(
            f"soak: daemon at 1 Hz with {args.worlds} worlds for {args.minutes:g} min (+{args.warmup:g} s warm-up)"
        )
        row: dict[str, Any] = e2e.run_worker(
            url, "daemon", args.worlds, args.warmup, seconds, mode="sustain", concurrency=args.concurrency
        )
    finally:
        e2e.drop_pg_database(args.postgres_url, url)
    growth = (row["rss_mib_end"] - row["rss_mib_start"]) / row["rss_mib_start"] * 100.0
    row.update(worlds=args.worlds, minutes=args.minutes, rss_growth_percent=growth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    progress(
        f"soak: RSS {row['rss_mib_start']:.1f} → {row['rss_mib_end']:.1f} MiB ({growth:+.2f} %; "
        f"brk heap {row['brk_heap_mib_start']:.1f} → {row['brk_heap_mib_end']:.1f} MiB), "
        f"p99 lag {row['p99_lag_ms']:.1f} ms, missed {row['missed_ticks']}, "
        f"{row['npc_decisions_per_s']:.0f} NPC decisions/s"
    )
    return 0 if growth < 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
