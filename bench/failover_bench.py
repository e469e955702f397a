"""Failover of world leases: SIGKILL one of three daemons, repeatedly, and time the takeover.

For each kill: the time from SIGKILL (database clock) until every world the
victim held has committed a tick under another owner. The victim is then
restarted and the cluster rebalanced before the next kill. At the end every
committed tick (recorded by a trigger) is checked against the ticks each
daemon reported: any tick applied twice, by a non-owner, or with world time
going backwards fails the run.

    python bench/failover_bench.py --url postgresql+psycopg://postgres@127.0.0.1/test

Creates and drops its own database next to the one in ``--url``. Figures on a
shared or loaded machine are noisy; say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.cluster import Cluster, check_accounting, poll

NAMES = ("a", "b", "c")


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="any PostgreSQL database on the server (SQLAlchemy URL)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--worlds", type=int, default=30)
    parser.add_argument("--ttl", type=float, default=5.0, help="lease_ttl_seconds")
    parser.add_argument("--discovery", type=float, default=1.0, help="discovery_interval_seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="tickIntervalSeconds of every world")
    args = parser.parse_args()

    name = f"failover_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(args.url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(args.url).set(drivername="postgresql+psycopg", database=name).render_as_string(False)
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    cluster = Cluster(url, workdir, ttl=args.ttl, discovery=args.discovery)
    share = -(-args.worlds // len(NAMES))
    takeovers: list[float] = []
    per_world: list[float] = []
    try:
        cluster.reset(args.worlds, tick_interval=args.interval)
        for n in NAMES:
            cluster.start(n)
        for i in range(args.kills):
            poll(
                lambda: (
                    sum((o := cluster.owners()).values()) == args.worlds
                    and set(o) == set(NAMES)
                    and max(o.values()) <= share
                ),
                timeout=180,
                what="a balanced cluster",
            )
            victim = NAMES[i % len(NAMES)]
            worlds = {w for w, (owner, _) in cluster.leases().items() if owner == victim}
            killed_at = cluster.db_now()
            cluster.signal(victim, signal.SIGKILL)
            cluster.daemons[victim].proc.wait(timeout=30)

            def resumed(
                worlds: set[int] = worlds, victim: str = victim, killed_at: object = killed_at
            ) -> dict[int, float]:
                first: dict[int, float] = {}
                for w, _, _, owner, _, at in cluster.audit():
                    if w in worlds and owner != victim and at > killed_at and w not in first:  # type: ignore[operator]
                        first[w] = (at - killed_at).total_seconds()  # type: ignore[operator]
                return first if set(first) == worlds else {}

            first = poll(resumed, timeout=120, what=f"{victim}'s worlds to resume")
            takeovers.append(max(first.values()))
            per_world.extend(first.values())
            print(
                f"kill {i + 1}/{args.kills}: {victim} held {len(worlds)} worlds; all resumed after "
                f"{max(first.values()):.2f}s (first {min(first.values()):.2f}s)",
                flush=True,
            )
            cluster.start(victim)  # same instance id: rejoins and gets its share back
        cluster.stop_all()
        figures = check_accounting(cluster, killed=NAMES)
    finally:
        cluster.close()
        with psycopg.connect(_libpq(args.url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary = {
        "kills": args.kills,
        "worlds": args.worlds,
        "lease_ttl_seconds": args.ttl,
        "discovery_interval_seconds": args.discovery,
        "tick_interval_seconds": args.interval,
        "bound_ttl_plus_discovery_plus_interval": args.ttl + args.discovery + args.interval,
        "all_worlds_resumed_seconds": {
            "median": round(statistics.median(takeovers), 3),
            "worst": round(max(takeovers), 3),
        },
        "per_world_resumed_seconds": {
            "median": round(statistics.median(per_world), 3),
            "worst": round(max(per_world), 3),
        },
        "committed_ticks_audited": figures["committed"],
        "double_applied_ticks": 0,  # check_accounting raises on any
        "unreported_last_ticks_of_killed_daemons": figures["unreported"],
        "logs": str(workdir),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
