"""What the scheduler and the runner use of the store, declared: ``WorldSource`` and ``TickStore``.

:class:`~scheduler_daemon.store.repository.Store` satisfies both; a stand-in
(``bench/noop.py``'s store) implements them without a database.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.simulation import generation as gen
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier
from scheduler_daemon.store.chains import ChainRecord, ChainUpdate
from scheduler_daemon.store.generation import ClaimResult, GenerationRequest
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.npcs import PlacementRecord
from scheduler_daemon.store.sessions import ActiveSessions
from scheduler_daemon.store.ticks import DueNpcs, DueWork, WorldAdvance
from scheduler_daemon.store.worlds import WorldRecord, WorldStatus


class WorldSource(Protocol):
    """What the runner's discovery reads: the worlds that should run, every active session, config versions."""

    async def discover_active_worlds(self) -> dict[int, int]: ...

    async def world_statuses(self, world_ids: Collection[int]) -> dict[int, WorldStatus]: ...

    async def active_session_views(self) -> ActiveSessions: ...


class TickStore(WorldSource, Protocol):
    """What :class:`~scheduler_daemon.scheduler.WorldScheduler` reads and writes, and the runner's discovery.

    Statements taking ``conn`` run in the caller's transaction (``transaction()``)
    or on its reading connection (``connect()``).
    """

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection]: ...

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]: ...

    # Registration, reloads, resyncs.
    async def get_world(self, world_id: int, conn: AsyncConnection | None = None) -> WorldRecord: ...

    async def create_missing_states(self, conn: AsyncConnection, world_ids: Collection[int]) -> list[int]: ...

    async def load_worlds(self, conn: AsyncConnection, world_ids: Collection[int]) -> dict[int, WorldRecord]: ...

    async def restore_world_state(
        self,
        conn: AsyncConnection,
        world_id: int,
        *,
        world_time: float,
        ticks: int,
        advanced_at: datetime | None,
        lease: Lease | None = None,
    ) -> bool: ...

    # Tier assignment.
    async def session_views_many(self, conn: AsyncConnection, world_ids: Collection[int]) -> ActiveSessions: ...

    async def npc_placements_many(
        self, conn: AsyncConnection, world_ids: Collection[int]
    ) -> dict[int, list[PlacementRecord]]: ...

    async def write_tier_changes(
        self, conn: AsyncConnection, changes: Mapping[int, Mapping[int, tuple[Tier, float | None]]]
    ) -> None: ...

    # The grouped tick.
    def group_savepoint(self, conn: AsyncConnection) -> AbstractAsyncContextManager[None]: ...

    async def select_due_npcs_many(
        self, conn: AsyncConnection, requests: Sequence[tuple[int, float, int]]
    ) -> DueNpcs: ...

    async def due_work_many(
        self, conn: AsyncConnection, requests: Sequence[tuple[int, float]]
    ) -> dict[int, DueWork]: ...

    async def oldest_waiting_many(
        self, conn: AsyncConnection, requests: Sequence[tuple[int, float, Mapping[Tier, tuple[float, int]]]]
    ) -> dict[int, dict[Tier, float]]: ...

    async def fence_tick(self, conn: AsyncConnection, lease: Lease) -> int: ...

    async def write_decisions(
        self,
        conn: AsyncConnection,
        world_id: int,
        decisions: Sequence[NpcDecision],
        read: Sequence[NpcState] | None = None,
    ) -> None: ...

    async def write_decisions_many(
        self,
        conn: AsyncConnection,
        batches: Sequence[tuple[int, Sequence[NpcDecision]]],
        read: Sequence[Sequence[NpcState]] | None = None,
    ) -> None: ...

    async def advance_world_states(self, conn: AsyncConnection, advances: Sequence[WorldAdvance]) -> None: ...

    # Chains and generation claims inside the tick.
    async def select_due_chains(
        self, conn: AsyncConnection, world_id: int, world_time: float, limit: int
    ) -> list[ChainRecord]: ...

    async def write_chain_updates(
        self, conn: AsyncConnection, world_id: int, updates: Sequence[ChainUpdate]
    ) -> None: ...

    async def fail_chains(self, conn: AsyncConnection, world_id: int, failures: Sequence[tuple[int, str]]) -> None: ...

    async def claim_requests(
        self,
        conn: AsyncConnection,
        world_id: int,
        world_time: float,
        *,
        max_ops: int,
        max_in_flight_per_world: int,
        max_in_flight_per_user: int,
    ) -> ClaimResult: ...

    # The outbox hand-off after the commit.
    async def outbox(self, conn: AsyncConnection, world_id: int, limit: int) -> list[GenerationRequest]: ...

    async def mark_handed_off(self, conn: AsyncConnection, world_id: int, request_ids: Sequence[int]) -> None: ...

    async def mark_handoff_failed(
        self, conn: AsyncConnection, world_id: int, request_id: int, decision: gen.RetryDecision, error: str
    ) -> None: ...
