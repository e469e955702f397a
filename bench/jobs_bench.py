"""Generation-request claim throughput on PostgreSQL with quotas active.

Creates its own database next to ``--url`` (dropped afterwards), queues
``--requests`` pending requests over ``--users`` users of one world, and
measures two things:

* ``claim``: the claim alone (``claim_requests`` in its own transaction,
  commit included), with workers completing everything instantly between
  claims so only the quotas and the per-tick budget limit it;
* ``tick``: full ``WorldScheduler.tick_world`` calls (NPC-less world: claim,
  world-state fence, commit, then the outbox hand-off to the default sink).

Every claim leaves dead index entries at the head of the pending range until
(auto)vacuum removes them, so a long run without vacuum slows down; compare
``--vacuum-every 0`` (worst case) with e.g. ``--vacuum-every 20``.

Usage::

    .venv/bin/python bench/jobs_bench.py --url postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from scheduler_daemon.logs import configure_logging
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.models import generation_requests
from scheduler_daemon.store.repository import Store


async def seed(store: Store, count: int, users: int, simulation: dict[str, object]) -> int:
    world_id = await store.create_world("bench", simulation=simulation)
    sessions = [await store.add_session(world_id, f"user-{u}") for u in range(users)]
    rows = [
        {
            "world_id": world_id,
            "session_id": sessions[i % users],
            "user_id": f"user-{i % users}",
            "kind": "portrait",
            "payload": {"i": i, "prompt": "a lighthouse at dusk"},
            "priority": (i // 7) % 5,  # not correlated with the user
        }
        for i in range(count)
    ]
    async with store.transaction() as conn:
        for start in range(0, count, 5000):
            await conn.execute(sa.insert(generation_requests), rows[start : start + 5000])
    # Fresh statistics, as a live table has them: without, the planner walks the
    # whole pending range for the id-list lock instead of the primary key.
    async with store.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("ANALYZE generation_requests"))
    return world_id


async def finish_in_flight(store: Store, world_id: int) -> None:
    """Instant workers: everything in flight succeeds (not timed)."""
    async with store.transaction() as conn:
        await conn.execute(
            sa.update(generation_requests)
            .where(
                generation_requests.c.world_id == world_id,
                generation_requests.c.status.in_(("enqueued", "running")),
            )
            .values(status="succeeded")
        )


async def vacuum(store: Store) -> None:
    """What autovacuum does eventually: drop the dead index entries claims leave behind (not timed)."""
    async with store.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("VACUUM generation_requests"))


async def bench_claim(store: Store, args: argparse.Namespace) -> tuple[float, list[float]]:
    world_id = await seed(store, args.requests, args.users, {})
    claimed, timings = 0, []
    while claimed < args.requests:
        started = time.perf_counter()
        async with store.transaction() as conn:
            result = await store.claim_requests(
                conn,
                world_id,
                0.0,
                max_ops=args.max_ops,
                max_in_flight_per_world=args.per_world,
                max_in_flight_per_user=args.per_user,
            )
        timings.append(time.perf_counter() - started)
        if not result.claimed:
            raise RuntimeError("claim made no progress")
        claimed += len(result.claimed)
        await finish_in_flight(store, world_id)
        if args.vacuum_every and len(timings) % args.vacuum_every == 0:
            await vacuum(store)
    return claimed / sum(timings), timings


async def bench_tick(store: Store, args: argparse.Namespace) -> tuple[float, list[float]]:
    simulation = {
        "maxJobOpsPerStep": args.max_ops,
        "generation": {"maxInFlightPerWorld": args.per_world, "maxInFlightPerUser": args.per_user},
    }
    world_id = await seed(store, args.requests, args.users, simulation)
    scheduler = WorldScheduler(store)
    await scheduler.register_world(world_id)
    claimed, timings = 0, []
    while claimed < args.requests:
        started = time.perf_counter()
        result = await scheduler.tick_world(world_id, 1.0)
        timings.append(time.perf_counter() - started)
        if not result.jobs_enqueued:
            raise RuntimeError("tick claimed nothing")
        claimed += result.jobs_enqueued
        await finish_in_flight(store, world_id)
        if args.vacuum_every and len(timings) % args.vacuum_every == 0:
            await vacuum(store)
    return claimed / sum(timings), timings


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("SCHEDULER_TEST_POSTGRES_URL"), help="PostgreSQL server URL")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--max-ops", type=int, default=100, help="maxJobOpsPerStep")
    parser.add_argument("--per-world", type=int, default=200, help="generation.maxInFlightPerWorld")
    parser.add_argument("--per-user", type=int, default=5, help="generation.maxInFlightPerUser")
    parser.add_argument(
        "--vacuum-every",
        type=int,
        default=0,
        help="VACUUM the table every N claims (untimed), as autovacuum would; 0 = never (worst case)",
    )
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    if not args.url:
        parser.error("--url or SCHEDULER_TEST_POSTGRES_URL is required")
    name = f"jobs_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(args.url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(args.url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    store = Store.from_url(url)
    try:
        await store.upgrade()
        print(
            f"{args.requests} requests, {args.users} users, maxJobOpsPerStep {args.max_ops}, "
            f"maxInFlightPerWorld {args.per_world}, maxInFlightPerUser {args.per_user}, "
            f"vacuum every {args.vacuum_every or 'never'}"
        )
        for label, fn in (("claim", bench_claim), ("tick", bench_tick)):
            rate, timings = await fn(store, args)
            ms = sorted(t * 1000 for t in timings)
            print(
                f"{label:5s}: {rate:9.0f} requests/s  ({len(timings)} claims, "
                f"median {statistics.median(ms):.2f} ms, p95 {ms[int(len(ms) * 0.95) - 1]:.2f} ms)"
            )
    finally:
        await store.dispose()
        with psycopg.connect(_libpq(args.url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
