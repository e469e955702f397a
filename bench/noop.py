"""A :class:`WorldScheduler` whose tick does no I/O: measures the runner alone."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.scheduler import TickResult, WorldScheduler, _World
from scheduler_daemon.simulation.behavior import BehaviorContent
from scheduler_daemon.simulation.tiers import sessions_fingerprint
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.sessions import ActiveSessions
from scheduler_daemon.store.worlds import WorldStatus
from scheduler_daemon.world_config import parse_world_config


def _result(world_id: int, delta: float) -> TickResult:
    return TickResult(world_id, 0.0, 0.0, delta, 0.0, 0, 0, 0, {}, 0.0, False, False)


class NoopStore:
    """Discovery without a database: every world the scheduler knows stays active at version 1.

    A :class:`~scheduler_daemon.store.protocol.TickStore`: the statements of a
    tick are there too, but :class:`NoopScheduler` overrides every method that
    would run one, so they only raise.
    """

    def __init__(self) -> None:
        self.worlds: dict[int, int] = {}

    async def discover_active_worlds(self) -> dict[int, int]:
        return dict(self.worlds)

    async def world_statuses(self, world_ids: Collection[int]) -> dict[int, WorldStatus]:
        return {w: WorldStatus(self.worlds[w], True) for w in world_ids if w in self.worlds}

    async def active_session_views(self) -> ActiveSessions:
        # No players online: discovery still compares every world's tier inputs, as in the daemon.
        return ActiveSessions({}, [])

    def _no_database(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("NoopScheduler never touches the database")

    transaction = connect = get_world = create_missing_states = load_worlds = restore_world_state = _no_database
    session_views_many = npc_placements_many = write_tier_changes = _no_database
    select_due_npcs_many = due_work_many = oldest_waiting_many = fence_tick = _no_database
    write_decisions = write_decisions_many = advance_world_states = _no_database
    select_due_chains = write_chain_updates = fail_chains = claim_requests = _no_database
    outbox = mark_handed_off = mark_handoff_failed = _no_database


class NoopScheduler(WorldScheduler):
    """Registers worlds with the default config (1 s interval) and ticks them without a database."""

    def __init__(self) -> None:
        self.noop_store = NoopStore()
        super().__init__(self.noop_store)
        self._config = parse_world_config({}, world_id=0)
        self._result = _result(0, 0.0)
        self._no_sessions = sessions_fingerprint([])

    async def register_worlds(
        self, requests: Sequence[tuple[int, Lease | None]]
    ) -> dict[int, WorldSimulationContext | Exception]:
        return {world_id: await self.register_world(world_id) for world_id, _ in requests}

    async def register_world(self, world_id: int, *, lease: Lease | None = None) -> WorldSimulationContext:
        # No database, no leases: the runner passes one only when several daemons share PostgreSQL.
        ctx = WorldSimulationContext(world_id, self._config)
        # As after the daemon's tier assignment at registration: no sessions, nothing to recompute.
        ctx.sessions_fingerprint = self._no_sessions
        self._worlds[world_id] = _World(ctx, BehaviorContent())
        self.registrations += 1
        self.noop_store.worlds[world_id] = ctx.config_version
        return ctx

    async def tick_world(
        self, world_id: int, delta_real_seconds: float, *, wall_at: datetime | None = None
    ) -> TickResult:
        return self._result

    async def tick_worlds(self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None) -> list[Any]:
        return [self._result] * len(requests)
