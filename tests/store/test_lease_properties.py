"""Property: no two owners ever commit a tick for the same world and epoch.

A hypothesis state machine drives three daemon processes through claims,
renewals, releases, fenced commits (also while a peer tries to claim the
locked row) and a controllable database clock, against a real PostgreSQL.
A pure model of the lease rows predicts every outcome; owners keep their
(possibly stale) beliefs, like a daemon that was paused past its TTL; two
of them share an instance id (a restart while the old process is frozen), so
the owner column alone cannot tell them apart: the epoch must.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from scheduler_daemon.store.leases import Lease, LeaseStore
from scheduler_daemon.store.repository import Store
from tests.conftest import make_store, require_postgres_url

pytestmark = pytest.mark.postgres

T = TypeVar("T")
TTL = 10.0
#: Processes; the instance id is the first letter ("a1" and "a2" are two incarnations of "a").
OWNERS = ("a1", "a2", "b1")
WORLD_COUNT = 3


class LeaseMachine(RuleBasedStateMachine):
    # One loop and engine for all examples (set by the test): connecting per example is the slow part.
    loop: asyncio.AbstractEventLoop
    store: Store
    world_ids: list[int] = []

    def __init__(self) -> None:
        super().__init__()
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.leases = {o: LeaseStore(self.store.engine, o[0], TTL, now=self._db_now) for o in OWNERS}
        # Model of the rows: world -> (owner, epoch, expires_at); beliefs: owner -> {world: epoch}.
        self.model: dict[int, tuple[str | None, int, datetime | None]] = {w: (None, 0, None) for w in self.world_ids}
        self.beliefs: dict[str, dict[int, int]] = {o: {} for o in OWNERS}
        self.commits: dict[tuple[int, int], set[str]] = {}
        self.ticks = dict.fromkeys(self.world_ids, 0)
        self._run(self._reset())

    def _db_now(self) -> sa.ColumnElement[datetime]:
        return sa.literal(self.now, sa.DateTime(timezone=True))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _reset(self) -> None:
        async with self.store.transaction() as conn:
            await conn.execute(
                sa.text(
                    "UPDATE world_states SET lease_owner = NULL, lease_expires_at = NULL, lease_epoch = 0, "
                    "ticks = 0, world_time = 0"
                )
            )

    # ----------------------------------------------------------------- model
    def _free(self, world_id: int) -> bool:
        owner, _, expires = self.model[world_id]
        return owner is None or (expires is not None and expires <= self.now)

    def _ours(self, owner: str, world_id: int) -> bool:
        m_owner, m_epoch, _ = self.model[world_id]
        return m_owner == owner[0] and self.beliefs[owner].get(world_id) == m_epoch

    def _expect_claim(self, owner: str, candidates: list[int], limit: int, locked: int | None = None) -> list[int]:
        eligible = [w for w in sorted(candidates) if self._free(w) and w != locked][:limit]
        for w in eligible:
            self.model[w] = (owner[0], self.model[w][1] + 1, self.now + timedelta(seconds=TTL))
        return eligible

    def _record_claim(self, owner: str, got: list[Lease], expected: list[int]) -> None:
        assert [x.world_id for x in got] == expected
        for lease in got:
            assert lease.epoch == self.model[lease.world_id][1]
            self.beliefs[owner][lease.world_id] = lease.epoch

    async def _commit(self, lease: Lease) -> bool:
        try:
            async with self.store.transaction() as conn:
                ticks = await self.store.fence_tick(conn, lease)
                await self.store.advance_world_state(
                    conn, lease.world_id, world_time=float(ticks + 1), expected_ticks=ticks, fence=lease.fence
                )
        except Exception:
            return False
        return True

    def _record_commit(self, owner: str, world_id: int, ok: bool) -> None:
        expected = self._ours(owner, world_id)
        assert ok == expected, f"{owner} commit on world {world_id}: got {ok}, model says {expected}"
        if ok:
            owner_id, epoch, _ = self.model[world_id]
            self.model[world_id] = (owner_id, epoch, self.now + timedelta(seconds=TTL))  # a tick renews
            # Keyed by the epoch the row had when the commit landed (the model is checked against it).
            self.commits.setdefault((world_id, self.model[world_id][1]), set()).add(owner)
            self.ticks[world_id] += 1

    # ----------------------------------------------------------------- rules
    @rule(seconds=st.sampled_from([0.5, TTL / 3, TTL - 0.5, TTL, TTL + 0.5, 2 * TTL]))
    def advance_db_clock(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, WORLD_COUNT), subset=st.booleans())
    def claim(self, owner: str, limit: int, subset: bool) -> None:
        # Like the runner: candidates are the worlds we do not believe we hold.
        candidates = [w for w in self.world_ids if not subset or w not in self.beliefs[owner]]
        expected = self._expect_claim(owner, candidates, limit)
        got = self._run(self.leases[owner].claim(candidates, limit))
        self._record_claim(owner, got, expected)

    @rule(owner=st.sampled_from(OWNERS))
    def renew(self, owner: str) -> None:
        believed = [Lease(w, owner[0], e) for w, e in self.beliefs[owner].items()]
        expected = {w for w in self.beliefs[owner] if self._ours(owner, w)}
        result = self._run(self.leases[owner].renew(believed))
        assert result.renewed == expected
        assert result.lost == set(self.beliefs[owner]) - expected  # nothing is locked here
        for w in expected:
            self.model[w] = (owner[0], self.model[w][1], self.now + timedelta(seconds=TTL))

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def release(self, owner: str, data: st.DataObject) -> None:
        if not self.beliefs[owner]:
            return
        w = data.draw(st.sampled_from(sorted(self.beliefs[owner])))
        expected = {w} if self._ours(owner, w) else set()
        assert self._run(self.leases[owner].release([Lease(w, owner[0], self.beliefs[owner][w])])) == expected
        if expected:
            self.model[w] = (None, self.model[w][1], None)
        del self.beliefs[owner][w]

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def commit(self, owner: str, data: st.DataObject) -> None:
        if not self.beliefs[owner]:
            return
        w = data.draw(st.sampled_from(sorted(self.beliefs[owner])))
        ok = self._run(self._commit(Lease(w, owner[0], self.beliefs[owner][w], TTL, self._db_now)))
        self._record_commit(owner, w, ok)

    @precondition(lambda self: any(self.beliefs.values()))
    @rule(data=st.data())
    def commit_while_a_peer_claims(self, data: st.DataObject) -> None:
        """Owner holds the fenced row lock; a peer's claim skips that row, then the owner commits."""
        owner = data.draw(st.sampled_from([o for o in OWNERS if self.beliefs[o]]))
        peer = data.draw(st.sampled_from([o for o in OWNERS if o[0] != owner[0]]))
        w = data.draw(st.sampled_from(sorted(self.beliefs[owner])))
        lease = Lease(w, owner[0], self.beliefs[owner][w], TTL, self._db_now)

        async def scenario() -> tuple[bool, list[Lease]]:
            conn = await self.store.engine.connect()
            try:
                trans = await conn.begin()
                try:
                    ticks = await self.store.fence_tick(conn, lease)
                except Exception:
                    await trans.rollback()
                    return False, await self.leases[peer].claim(self.world_ids, WORLD_COUNT)
                got = await self.leases[peer].claim(self.world_ids, WORLD_COUNT)
                await self.store.advance_world_state(
                    conn, w, world_time=float(ticks + 1), expected_ticks=ticks, fence=lease.fence
                )
                await trans.commit()
                return True, got
            finally:
                await conn.close()

        holds = self._ours(owner, w)
        ok, got = self._run(scenario())
        self._record_commit(owner, w, ok)
        expected = self._expect_claim(peer, self.world_ids, WORLD_COUNT, locked=w if holds else None)
        self._record_claim(peer, got, expected)

    # ------------------------------------------------------------ invariants
    @invariant()
    def one_owner_per_world_and_epoch(self) -> None:
        for key, owners in self.commits.items():
            assert len(owners) == 1, f"world {key[0]} epoch {key[1]} committed by {sorted(owners)}"

    @invariant()
    def database_matches_the_model(self) -> None:
        async def rows() -> list[Any]:
            async with self.store.engine.connect() as conn:
                return list(
                    (
                        await conn.execute(
                            sa.text(
                                "SELECT world_id, lease_owner, lease_epoch, lease_expires_at, ticks FROM world_states"
                            )
                        )
                    ).all()
                )

        for w, owner, epoch, expires, ticks in self._run(rows()):
            if w in self.model:
                assert (owner, epoch, expires) == self.model[w]
                assert ticks == self.ticks[w]  # every tick applied exactly once


def test_no_two_owners_commit_for_the_same_world_and_epoch(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    require_postgres_url()
    loop = asyncio.new_event_loop()
    try:

        async def setup() -> tuple[Store, list[int]]:
            store = await make_store("postgres", tmp_path, request)
            return store, [await store.create_world(f"w{i}") for i in range(WORLD_COUNT)]

        LeaseMachine.loop = loop
        LeaseMachine.store, LeaseMachine.world_ids = loop.run_until_complete(setup())
        try:
            run_state_machine_as_test(
                LeaseMachine,
                settings=settings(
                    max_examples=25,
                    stateful_step_count=25,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                ),
            )
        finally:
            loop.run_until_complete(LeaseMachine.store.dispose())
    finally:
        loop.close()
