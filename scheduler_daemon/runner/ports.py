"""What the runner depends on, declared: a tick engine, a world source, an observer of its events.

The world source is the store's :class:`~scheduler_daemon.store.protocol.WorldSource`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.scheduler import TickResult
from scheduler_daemon.simulation.tiers import SessionView
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.protocol import WorldSource
from scheduler_daemon.store.sessions import IgnoredSession
from scheduler_daemon.store.worlds import WorldRecord

__all__ = ["TickEngine", "TickObserver", "WorldSource"]


class TickEngine(Protocol):
    """Registers worlds and ticks them (:class:`~scheduler_daemon.scheduler.WorldScheduler`)."""

    @property
    def store(self) -> WorldSource:
        """The database it ticks against: the runner's world source unless it is given another."""

    async def register_worlds(
        self, requests: Sequence[tuple[int, Lease | None]]
    ) -> dict[int, WorldSimulationContext | Exception]: ...

    async def unregister_world(self, world_id: int) -> None: ...

    async def reload_world(
        self, world_id: int, *, elapsed_real_since_tick: float = 0.0, record: WorldRecord | None = None
    ) -> WorldSimulationContext: ...

    async def tick_world(
        self, world_id: int, delta_real_seconds: float, *, wall_at: datetime | None = None
    ) -> TickResult: ...

    async def tick_worlds(
        self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None
    ) -> list[TickResult | BaseException]: ...

    def tiers_outdated(self, world_id: int, sessions: Sequence[SessionView]) -> bool: ...

    async def refresh_tiers(self, world_id: int, sessions: Sequence[SessionView] | None = None) -> Any: ...

    def note_ignored_sessions(self, ignored: Sequence[IgnoredSession]) -> None: ...

    async def restore_missing_state(self, world_id: int) -> bool: ...

    async def resync_world(self, world_id: int) -> WorldSimulationContext: ...

    def get_all_contexts(self) -> dict[int, WorldSimulationContext]: ...

    @property
    def registrations(self) -> int:
        """Moves with every registration and unregistration."""

    @property
    def ignored_sessions(self) -> int: ...

    def get_stats(self) -> dict[str, Any]: ...


class TickObserver(Protocol):
    """Receives runner events (metrics implement this).

    ``lag_seconds`` of a finished tick is its start minus its slot's
    deadline: negative (by at most ``batch_window_seconds``) when the loop
    coalesced it into a batch ahead of its deadline, NaN for a forced tick.
    """

    def tick_finished(
        self, world_id: int, outcome: str, lag_seconds: float, duration_seconds: float, result: TickResult | None
    ) -> None: ...

    def ticks_missed(self, world_id: int, slots: int) -> None: ...

    def world_registered(self, world_id: int) -> None: ...

    def world_unregistered(self, world_id: int) -> None: ...

    def db_error(self, operation: str) -> None: ...
