"""``SchedulerBase``: the state the scheduler's concerns share, and how they call each other.

``WorldScheduler`` is one object assembled from one class per concern
(registry, tiers, group ticking, tick body, chains and generation), all over
this state. The methods one concern calls on another are declared here for
the type checker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scheduler_daemon.scheduler.results import TickListener, _World

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from scheduler_daemon.context import TickOutcome, WorldSimulationContext
    from scheduler_daemon.generation import GenerationSink
    from scheduler_daemon.scheduler.results import TickResult, _Assigned, _Body, _GroupReads, _Planned
    from scheduler_daemon.simulation.behavior import DecideFn
    from scheduler_daemon.simulation.tiers import SessionView, TierAssignment
    from scheduler_daemon.store.protocol import TickStore
    from scheduler_daemon.store.sessions import ActiveSessions


class SchedulerBase:
    """Shared state of :class:`~scheduler_daemon.scheduler.engine.WorldScheduler` (set in its ``__init__``)."""

    store: TickStore
    #: Raw camelCase simulation config under each world's own.
    defaults: dict[str, Any]
    decide_fn: DecideFn
    sink: GenerationSink
    sink_timeout_seconds: float
    on_commit: TickListener | None
    _worlds: dict[int, _World]
    #: Bumped by every registration and unregistration: a runner looks for worlds
    #: registered by hand only when it moved (see the runner's ``adopt_registered``).
    registrations: int
    _ignored_sessions: dict[int, str]  # session id -> why tiering cannot read it

    if TYPE_CHECKING:
        # registry
        def _require(self, world_id: int) -> _World: ...
        # tiers
        async def _assign_tiers(self, entry: _World, sessions: Sequence[SessionView] | None) -> TierAssignment: ...
        async def _compute_tiers(
            self, conn: AsyncConnection, entries: Mapping[int, _World], sessions: ActiveSessions | None
        ) -> dict[int, _Assigned]: ...
        def _adopt_tiers(self, entry: _World, assigned: _Assigned) -> None: ...
        # tick body
        async def _tick_body(self, conn: AsyncConnection, planned: _Planned, reads: _GroupReads) -> _Body: ...
        def _finish_body(self, planned: _Planned, body: _Body) -> TickOutcome: ...
        def _apply(self, planned: _Planned, outcome: TickOutcome, *, debug: bool) -> TickResult: ...
        # chains and generation
        async def _advance_chains(
            self,
            conn: AsyncConnection,
            ctx: WorldSimulationContext,
            now: float,
            events: list[tuple[int, str, dict[str, Any]]],
        ) -> int: ...
        async def _hand_off(self, entry: _World, deadline: float) -> None: ...
