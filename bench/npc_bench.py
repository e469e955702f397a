"""NPC simulation benchmarks (not tests): run with ``make bench-npc``.

1. Decisions per second of the pure behaviour function (the default
   ``decide`` with the demo content) over 100,000 NPC decisions.
2. The per-tick selection on PostgreSQL for one world of 100,000 NPCs:
   ``Store.select_due_npcs`` (the UNION ALL of one index range per tier) and
   ``Store.oldest_waiting`` (the backlog probe run when the budget is full),
   p50/p99 over many runs, with half of the NPCs due.

PostgreSQL comes from ``SCHEDULER_BENCH_POSTGRES_URL`` (else
``SCHEDULER_TEST_POSTGRES_URL``); a scratch database is created next to it and
dropped afterwards. Without either, part 2 is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import time
import uuid

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from scheduler_daemon.demo import DEMO_BEHAVIOR
from scheduler_daemon.simulation.behavior import decide, parse_behavior
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcState
from scheduler_daemon.simulation.tiers import last_taken
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.ticks import _DUE_MANY_PG
from scheduler_daemon.world_config import parse_world_config

DAY = 86_400.0


def bench_decide(count: int, rounds: int) -> None:
    content = parse_behavior(1, DEMO_BEHAVIOR)
    intervals = parse_world_config(None).tiers.intervals()
    rng = random.Random(1)
    routines = [*content.routines, None]
    activities = [*content.activities, None]
    npcs = []
    for i in range(count):
        start = rng.uniform(0, 7 * DAY)
        npcs.append(
            NpcState(
                id=i,
                world_id=1,
                name=f"n{i}",
                tier=rng.choice(SIMULATED_TIERS),
                next_decision_at=start + 3600.0,
                location="square",
                home=f"home{i % 50}",
                routine=rng.choice(routines),
                current_activity=rng.choice(activities),
                activity_started_at=start,
                energy=rng.uniform(0, 100),
                mood_valence=rng.uniform(-50, 50),
                mood_arousal=rng.uniform(-50, 50),
                state={"cooldowns": {"eat": start - 600.0}},
            )
        )
    # The 100,000 inputs live for the whole run (a daemon holds one budget's
    # worth at a time): keep the cyclic GC from re-scanning them every round.
    gc.collect()
    gc.freeze()
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        for npc in npcs:
            decide(npc, content, npc.next_decision_at, intervals[npc.tier])
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    gc.unfreeze()
    median, median_cpu = statistics.median(times), statistics.median(cpu)
    print(f"decide(): {count:,} decisions per round, {rounds} rounds")
    print(f"  median {count / median:,.0f} decisions/s wall ({median * 1e6 / count:.1f} us each)")
    # CPU time is what this process got: less distorted by other load on the machine.
    print(f"  median {count / median_cpu:,.0f} decisions per CPU-second ({median_cpu * 1e6 / count:.1f} us each)")


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _bench_selection(url: str, npcs: int, runs: int, budget: int) -> None:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        world_id = await store.create_world("bench", simulation={"maxNpcTicksPerStep": budget})
        other = await store.create_world("neighbour")
        # Bulk-load with generate_series (the bench's own SQL; the daemon never
        # needs a bulk load). Tier mix as capacities 100/1,000/10,000/rest would
        # give, next decisions spread over two game hours.
        async with store.transaction() as conn:
            for wid, count in ((world_id, npcs), (other, npcs // 10)):
                await conn.execute(
                    sa.text(
                        "INSERT INTO npcs (world_id, name, tier, next_decision_at, state) "
                        "SELECT :w, 'npc-' || g, "
                        "CASE WHEN g <= 100 THEN 0 WHEN g <= 1100 THEN 1 WHEN g <= 11100 THEN 2 ELSE 3 END, "
                        "random() * 7200, '{}'::jsonb FROM generate_series(1, :n) AS g"
                    ),
                    {"w": wid, "n": count},
                )
        async with store.transaction() as conn:
            await conn.execute(sa.text("ANALYZE npcs"))
        world_time = 3600.0  # half of the NPCs are due
        async with store.transaction() as conn:
            plan = (
                await conn.execute(
                    sa.text(
                        "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM npcs WHERE world_id = :w AND tier = 3 "
                        "AND next_decision_at <= :now ORDER BY next_decision_at, id LIMIT :lim"
                    ),
                    {"w": world_id, "now": world_time, "lim": budget},
                )
            ).all()
        # Server-side execution time of the whole selection statement (no client,
        # driver or event-loop overhead): EXPLAIN ANALYZE of the exact SQL.
        server_ms: list[float] = []
        explain = sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + _DUE_MANY_PG.text)
        async with store.engine.connect() as conn:
            for i in range(200):
                params = {"wids": [world_id], "nows": [world_time + (i % 100)], "lims": [budget]}
                result = await conn.execute(explain, params)
                server_ms.append(float(result.scalar_one()[0]["Execution Time"]))
        select_ms: list[float] = []
        waiting_ms: list[float] = []
        for i in range(runs):
            now = world_time + (i % 100)  # vary the bound a little, like successive ticks
            async with store.engine.connect() as conn:
                started = time.perf_counter()
                due = await store.select_due_npcs(conn, world_id, now, budget)
                select_ms.append((time.perf_counter() - started) * 1000)
                taken = last_taken(due)
                started = time.perf_counter()
                await store.oldest_waiting(conn, world_id, now, taken)
                waiting_ms.append((time.perf_counter() - started) * 1000)
                await conn.rollback()
        print(f"PostgreSQL selection: world of {npcs:,} NPCs (~half due), budget {budget}, {runs} runs each")
        print(f"  plan of one tier's range: {plan[0][0].strip()}")
        print(
            f"  server execution of the selection: p50 {_percentile(server_ms, 0.5):.3f} ms  "
            f"p99 {_percentile(server_ms, 0.99):.3f} ms (EXPLAIN ANALYZE, 200 runs)"
        )
        for name, values in (("select_due_npcs", select_ms), ("oldest_waiting", waiting_ms)):
            print(
                f"  {name:16s} p50 {_percentile(values, 0.5):.2f} ms  p99 {_percentile(values, 0.99):.2f} ms  "
                f"max {max(values):.2f} ms (round trip included)"
            )
    finally:
        await store.dispose()


def bench_selection(server_url: str, npcs: int, runs: int, budget: int) -> None:
    name = f"sched_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(_libpq(server_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server_url).set(drivername="postgresql+psycopg", database=name)
        asyncio.run(_bench_selection(url.render_as_string(hide_password=False), npcs, runs, budget))
    finally:
        with psycopg.connect(_libpq(server_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--npcs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--budget", type=int, default=50)
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    bench_decide(args.decisions, args.rounds)
    url = os.environ.get("SCHEDULER_BENCH_POSTGRES_URL") or os.environ.get("SCHEDULER_TEST_POSTGRES_URL")
    if url:
        bench_selection(url, args.npcs, args.runs, args.budget)
    else:
        print("PostgreSQL selection: skipped (set SCHEDULER_BENCH_POSTGRES_URL)")


if __name__ == "__main__":
    main()
