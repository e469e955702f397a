"""``RunnerBase``: the state the runner's concerns share, and how they call each other.

The runner is one object assembled from one class per concern (registry,
discovery, leasing, dispatch, batches, loop), all over this state. The
methods one concern calls on another are declared here for the type checker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scheduler_daemon.clock import Clock, TimerHandle
from scheduler_daemon.deadlines import DeadlineWheel
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.runner.ports import TickEngine, TickObserver, WorldSource
from scheduler_daemon.runner.state import BrokenWorld, PhaseSlots, RunnerLimits, Slot, TickCommits
from scheduler_daemon.runner.sync import BatchTimeouts, ResizableLimit

if TYPE_CHECKING:
    from scheduler_daemon.store.worlds import WorldRecord


class RunnerBase:
    """Shared state of :class:`~scheduler_daemon.runner.loop.SchedulerLoopRunner` (set in its ``__init__``)."""

    scheduler: TickEngine
    #: Where discovery reads which worlds should run and their sessions.
    worlds: WorldSource
    leases: LeaseKeeper | None
    clock: Clock
    limits: RunnerLimits
    observer: TickObserver | None
    #: Worlds that could not be registered, with the reason.
    broken: dict[int, BrokenWorld]
    #: Increases while the loop works (watchdog feed).
    progress: int
    idle_wake_seconds: float
    discovered: asyncio.Event
    registration: tuple[int, int]
    ticks_ok: int
    ticks_failed: int
    changes_applied: int
    commits: TickCommits
    _slots: dict[int, Slot]
    _deadlines: DeadlineWheel
    _phases: PhaseSlots
    _ready: deque[tuple[Slot, float]]
    _ready_alone: int
    _workers: int
    _limit: ResizableLimit
    _timeouts: BatchTimeouts
    _inflight: set[asyncio.Task[None]]
    _stopping: bool
    _wake: asyncio.Future[None] | None
    _timer: TimerHandle | None
    _pumping: bool
    _tick_timer: TimerHandle | None
    _tick_timer_at: float
    _next_discovery: float | None
    _registrations_seen: int  # the scheduler's ``registrations`` at the last adoption scan

    if TYPE_CHECKING:
        # registry
        async def add_worlds(
            self, world_ids: Sequence[int], *, first_deadline: float | None = None
        ) -> dict[int, Exception]: ...
        async def remove_world(self, world_id: int) -> None: ...
        async def apply_world_config(self, world_id: int, record: WorldRecord | None = None) -> None: ...
        async def _reconfigure(self, slot: Slot, record: WorldRecord | None = None) -> None: ...
        async def _unregister_held(self, slot: Slot) -> None: ...
        def _forget_unregistered(self, slot: Slot) -> None: ...
        def _place(self, slot: Slot, anchor: float) -> None: ...
        def _retire(self, slot: Slot) -> None: ...
        # adoption
        def adopt_registered(self) -> list[int]: ...
        async def _with_adopted(self, active: dict[int, int]) -> dict[int, int]: ...
        # discovery
        async def discover(self) -> None: ...
        async def refresh_tiers(self) -> list[int]: ...
        def discover_soon(self) -> bool: ...
        def _isolate(self, world_id: int, version: int, exc: Exception) -> None: ...
        # leasing
        async def _give_up(self, world_ids: list[int], *, reason: str) -> None: ...
        async def _balance(self, active: dict[int, int]) -> dict[int, int]: ...
        async def _drop_lost_in_tick(self, slot: Slot, reason: str) -> None: ...
        async def _keep_leases(self) -> None: ...
        # dispatch
        def _push(self, slot: Slot, deadline: float | None = None) -> None: ...
        def _poke(self) -> None: ...
        def _arm_ticks(self, at: float) -> None: ...
        def _pump(self) -> None: ...
        def next_deadline(self) -> float | None: ...
        def _dispatch_due(self, now: float, horizon: float | None = None) -> list[asyncio.Task[None]]: ...
        # batches
        async def _tick_batch(self, batch: list[tuple[Slot, float]]) -> None: ...
        def _tick_failed(self, exc: BaseException) -> None: ...
        # loop
        def _count_db_error(self, exc: BaseException, operation: str) -> None: ...
