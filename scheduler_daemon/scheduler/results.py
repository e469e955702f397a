"""What a tick returns, and the records the scheduler keeps per world and per tick.

``TickResult`` and ``CommittedTick`` are public (the runner, the admin API,
``simulate``); the underscored records are shared by the scheduler's modules
only (``_World`` is also built by ``bench/noop.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from scheduler_daemon.context import AdvancePlan, TickOutcome, WorldSimulationContext
from scheduler_daemon.simulation.behavior import BehaviorContent
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier
from scheduler_daemon.simulation.tiers import SessionView, TierAssignment
from scheduler_daemon.store.generation import ClaimResult
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.npcs import QuarantinedNpc
from scheduler_daemon.store.ticks import DueWork


class WorldNotRegisteredError(LookupError):
    """The world is not registered with this scheduler."""

    def __init__(self, world_id: int) -> None:
        self.world_id = world_id
        super().__init__(f"world {world_id} is not registered")


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did (returned by :meth:`~scheduler_daemon.scheduler.WorldScheduler.tick_world`)."""

    world_id: int
    world_time_before: float
    world_time_after: float
    delta_real_seconds: float
    delta_game_seconds: float
    npcs_simulated: int
    jobs_enqueued: int
    chain_steps: int
    npcs_per_tier: dict[str, int]
    duration_ms: float
    capped: bool
    paused: bool


@dataclass(frozen=True, slots=True)
class CommittedTick:
    """One committed tick's NPC work, for observers such as ``simulate``'s summary.

    ``npcs`` are the states as selected (before deciding), ``decisions`` the
    committed outcomes in the same order.
    """

    world_id: int
    world_time: float
    npcs: Sequence[NpcState]
    decisions: Sequence[NpcDecision]
    decision_lag_per_tier: Mapping[Tier, float]


#: Called after each committed tick (see :class:`~scheduler_daemon.scheduler.WorldScheduler`).
TickListener = Callable[[CommittedTick], None]


@dataclass(slots=True)
class _World:
    """A registered world: its context and behaviour, and what its next ticks need to know."""

    context: WorldSimulationContext
    behavior: BehaviorContent
    last_committed: CommittedTick | None = None  # handed to on_commit after apply
    # Claimed generation requests may await hand-off. True at registration, so
    # the first tick after a (re)start hands out what a crash left behind.
    outbox_pending: bool = True
    lease: Lease | None = None  # the fencing token when several daemons share the database


@dataclass(slots=True)
class _Planned:
    """A world's tick between planning and commit."""

    index: int  # position in the tick_worlds request
    entry: _World
    plan: AdvancePlan
    started: float  # perf_counter at planning, for duration_ms
    wall_at_start: datetime  # wall time the tick's world time corresponds to (for humans)
    # Log events of the tick body, emitted by _apply only once it committed
    # (the body may be rolled back and re-run): (level, event, fields).
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Body:
    """A world's tick body before its NPC and clock writes."""

    outcome: TickOutcome
    due: list[NpcState]
    decisions: list[NpcDecision]
    claim: ClaimResult


@dataclass(frozen=True, slots=True)
class _Assigned:
    """A tier assignment computed inside a transaction, for the context to adopt after the commit."""

    assignment: TierAssignment
    counts: dict[Tier, int]  # population per tier, quarantined rows counted as frozen
    sessions: list[SessionView]
    activities: dict[str | None, int]
    quarantined: dict[int, str]
    changed: int


@dataclass(frozen=True, slots=True)
class _GroupReads:
    """What a grouped tick reads once for all its worlds, before their bodies (by world id)."""

    due: Mapping[int, list[NpcState]]  # due NPCs, in decision order
    quarantined: Mapping[int, list[QuarantinedNpc]]  # rows the selection found undecidable
    pending: Mapping[int, DueWork]  # chain steps / generation claims to do
    waiting: Mapping[int, Mapping[Tier, float]]  # worlds with a full budget: oldest left waiting per tier
