"""The grouped tick's probe for chain steps and claimable requests matches what the tick would do.

A tick skips its chain and claim queries when ``Store.due_work_many`` says
there is nothing; the probe must therefore agree with ``select_due_chains``
and the claim's pending filter row for row, on both backends.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from scheduler_daemon import chains, generation
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.ticks import DueWork

NOTHING = DueWork(chains=False, requests=False)


async def test_empty_worlds_have_nothing_due(store: Store) -> None:
    a = await store.create_world("a")
    b = await store.create_world("b")
    async with store.transaction() as conn:
        assert await store.due_work_many(conn, [(a, 1e9), (b, 0.0)]) == {a: NOTHING, b: NOTHING}
        assert await store.due_work_many(conn, []) == {}


async def test_chain_is_due_exactly_when_its_next_step_is(store: Store) -> None:
    world = await store.create_world("w")
    chain = await chains.start_chain(store, world, [{"wait": 100}], chain_key="k", world_time=0.0)
    async with store.transaction() as conn:
        probe = await store.due_work_many(conn, [(world, 99.9)])
        assert probe[world] == NOTHING
        assert await store.select_due_chains(conn, world, 99.9, 10) == []
        assert (await store.due_work_many(conn, [(world, 100.0)]))[world].chains
        assert [c.id for c in await store.select_due_chains(conn, world, 100.0, 10)] == [chain]
    await chains.cancel_chain(store, chain)
    async with store.transaction() as conn:
        assert (await store.due_work_many(conn, [(world, 1e9)]))[world] == NOTHING


async def test_requests_are_claimable_when_pending_and_past_not_before(store: Store) -> None:
    world = await store.create_world("w")
    session = await store.add_session(world, "user")
    request = await generation.create_request(store, world, session, "portrait", {})
    async with store.transaction() as conn:
        assert (await store.due_work_many(conn, [(world, 0.0)]))[world].requests
        # Backing off in world time: not claimable before not_before.
        await conn.execute(text("UPDATE generation_requests SET not_before = 50 WHERE id = :i"), {"i": request})
        assert (await store.due_work_many(conn, [(world, 49.0)]))[world] == NOTHING
        assert (await store.due_work_many(conn, [(world, 50.0)]))[world].requests
        # Claimed already (enqueued): nothing left to claim.
        await conn.execute(text("UPDATE generation_requests SET status = 'enqueued' WHERE id = :i"), {"i": request})
        assert (await store.due_work_many(conn, [(world, 1e9)]))[world] == NOTHING


@pytest.mark.parametrize("worlds", [3, 450])  # 450: more than one SQLite chunk
async def test_each_world_is_probed_at_its_own_time(store: Store, worlds: int) -> None:
    ids = [await store.create_world(f"w{i}") for i in range(worlds)]
    for world in ids[::2]:
        await chains.start_chain(store, world, [{"wait": 10}], chain_key="k", world_time=0.0)
    async with store.transaction() as conn:
        probe = await store.due_work_many(conn, [(w, 10.0 if i % 4 == 0 else 5.0) for i, w in enumerate(ids)])
    assert {w for w, d in probe.items() if d.chains} == set(ids[::4])
    assert set(probe) == set(ids)
