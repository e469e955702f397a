"""PostgreSQL only: concurrent claimers never take the same generation request (FOR UPDATE SKIP LOCKED)."""

from __future__ import annotations

import asyncio

import pytest

from scheduler_daemon.store.repository import Store
from tests.support.helpers import count_by_status

pytestmark = pytest.mark.postgres

QUOTAS = {"max_in_flight_per_world": 100_000, "max_in_flight_per_user": 100_000}


async def seed(store: Store, count: int, users: int = 4) -> int:
    world_id = await store.create_world("race")
    sessions = [await store.add_session(world_id, f"user-{u}") for u in range(users)]
    async with store.transaction() as conn:
        for i in range(count):
            await store.insert_request(
                conn,
                world_id=world_id,
                session_id=sessions[i % users],
                user_id=f"user-{i % users}",
                npc_id=None,
                kind="k",
                payload={"i": i},
                priority=i % 3,
            )
    return world_id


async def test_two_open_claims_take_disjoint_rows_without_waiting(pg_store: Store) -> None:
    world_id = await seed(pg_store, 20)
    async with pg_store.engine.connect() as a, pg_store.engine.connect() as b:
        tx_a = await a.begin()
        tx_b = await b.begin()
        first = await pg_store.claim_requests(a, world_id, 0.0, max_ops=8, **QUOTAS)
        # A still holds its row locks; B must skip them, not wait for A's commit.
        second = await asyncio.wait_for(pg_store.claim_requests(b, world_id, 0.0, max_ops=8, **QUOTAS), timeout=10)
        assert len(first.claimed) == 8 and len(second.claimed) == 8
        assert not set(first.claimed) & set(second.claimed)
        await tx_a.commit()
        await tx_b.commit()
    counts = await count_by_status(pg_store, world_id)
    assert counts == {"enqueued": 16, "pending": 4}


async def test_racing_claimers_claim_every_row_exactly_once(pg_store: Store) -> None:
    world_id = await seed(pg_store, 300)

    async def claimer() -> list[int]:
        mine: list[int] = []
        while True:
            async with pg_store.transaction() as conn:
                result = await pg_store.claim_requests(conn, world_id, 0.0, max_ops=7, **QUOTAS)
            if not result.claimed:
                return mine
            mine += result.claimed

    results = await asyncio.gather(*(claimer() for _ in range(4)))
    everything = [rid for r in results for rid in r]
    assert len(everything) == len(set(everything)) == 300
    assert sum(1 for r in results if r) >= 2  # they really ran side by side
