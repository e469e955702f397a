"""``SchedulerLoopRunner``: ticks every registered world at its own rate.

One deadline queue for all worlds on the monotonic clock (no polling). Each
world runs on a fixed-rate grid ``anchor + k × tickIntervalSeconds``; a tick
that starts late covers the real time that elapsed (the engine advances world
time by it), slots that passed without a tick are skipped and counted, never
replayed in a burst. At most one tick per world is in flight.

Due worlds are ticked in batches: wakeups are coalesced over
``batch_window_seconds``, and up to ``max_concurrent_ticks`` batch workers
each hand up to ``max_batch_size`` worlds to ``TickEngine.tick_worlds``,
which commits them in one transaction with per-world atomicity. Each batch is
bounded by ``tick_timeout_seconds``. A world whose tick fails is backed off
exponentially and ticks alone until it succeeds; the others keep their rate.

With a :class:`~scheduler_daemon.leasing.LeaseKeeper` (several daemons on
one PostgreSQL) the runner only ticks worlds whose lease it holds: discovery
claims up to the fair share and sheds surplus at tick boundaries, a
background task renews every TTL/3, and a lost lease (fence or renewal)
drops the world at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from scheduler_daemon.clock import Clock, MonotonicClock
from scheduler_daemon.deadlines import DeadlineWheel
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.logs import get_logger
from scheduler_daemon.runner.adoption import Adoption
from scheduler_daemon.runner.batch import BatchTicking
from scheduler_daemon.runner.changes import ChangeApplication
from scheduler_daemon.runner.discovery import Discovery
from scheduler_daemon.runner.dispatch import Dispatch
from scheduler_daemon.runner.leasing import LeaseBalancing
from scheduler_daemon.runner.ports import TickEngine, TickObserver, WorldSource
from scheduler_daemon.runner.registry import WorldRegistry
from scheduler_daemon.runner.state import PhaseSlots, RunnerLimits, TickCommits
from scheduler_daemon.runner.sync import BatchTimeouts, ResizableLimit
from scheduler_daemon.store.errors import is_database_error

log = get_logger("scheduler_daemon.runner")

#: Wake at least this often even with nothing due, so "the loop is alive"
#: (watchdog progress) never depends on having worlds.
IDLE_WAKE_SECONDS = 1.0


class SchedulerLoopRunner(
    WorldRegistry, Adoption, ChangeApplication, Discovery, LeaseBalancing, Dispatch, BatchTicking
):
    """Runs the scheduler loop for all registered worlds.

    ``worlds`` (where discovery reads which worlds should run) defaults to the
    scheduler's store. ``start()`` runs until ``stop()``; ``run_once()`` ticks
    every due world once and returns (cron-style use, tests). ``run_until(t)``
    drives a :class:`~scheduler_daemon.clock.VirtualClock` deterministically.
    Worlds registered on the scheduler by hand are run too
    (:meth:`adopt_registered`).
    """

    def __init__(
        self,
        scheduler: TickEngine,
        worlds: WorldSource | None = None,
        *,
        clock: Clock | None = None,
        limits: RunnerLimits | None = None,
        observer: TickObserver | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.worlds = worlds if worlds is not None else scheduler.store
        self.leases = leases
        self.clock = clock or MonotonicClock()
        self.limits = limits or RunnerLimits()
        self.observer = observer
        self.broken = {}
        self.progress = 0
        #: Longest sleep of the loop with nothing due; the daemon lowers it under a
        #: short systemd watchdog so an idle loop still shows progress in time.
        self.idle_wake_seconds = IDLE_WAKE_SECONDS
        #: Set once the first discovery pass has finished (successfully or not).
        self.discovered = asyncio.Event()
        #: (worlds registered, worlds to register) of the current discovery pass.
        self.registration = (0, 0)
        self.ticks_ok = 0
        self.ticks_failed = 0
        #: Registered worlds whose changes :meth:`apply_changes` applied (a metric).
        self.changes_applied = 0
        #: Commits and database failures of ticks (``/readyz``).
        self.commits = TickCommits()
        self._slots = {}
        # (deadline, world_id, generation) entries, bucketed by millisecond.
        self._deadlines = DeadlineWheel()
        self._phases = PhaseSlots()
        self._ready = deque()  # due worlds waiting for a batch worker
        self._ready_alone = 0  # of them, worlds that tick in a batch of their own
        self._workers = 0  # batch workers running (each holds at most one transaction)
        self._limit = ResizableLimit(self.limits.max_concurrent_ticks)  # batches holding a transaction
        self._timeouts = BatchTimeouts()
        self._inflight = set()
        self._stopping = False
        self._wake = None
        self._timer = None  # wakes the loop task (discovery, idle)
        # While start() runs, a timer callback dispatches ticks (no task wakeup per window).
        self._pumping = False
        self._tick_timer = None
        self._tick_timer_at = math.inf
        self._next_discovery = None
        self._registrations_seen = -1

    def set_limits(self, limits: RunnerLimits) -> None:
        """Apply reloaded limits and discover at once; batches in flight finish under the old ones."""
        old, self.limits = self.limits, limits
        if limits.max_concurrent_ticks != old.max_concurrent_ticks:
            self._limit.resize(limits.max_concurrent_ticks)
        # A reload is when operators expect changed worlds to be picked up, not an interval later.
        self.discover_soon()

    async def run_once(self) -> dict[str, int]:
        """Tick every world whose deadline has arrived, once, and wait for them.

        Worlds registered on the scheduler by hand are adopted first and are
        due at once: ``register_world`` then a new runner's ``run_once()`` (a
        cron job) ticks each of them, covering the real time since its last
        committed tick, at most one interval (see :meth:`adopt_registered`).
        Discovery is not run here. Returns how many worlds ticked and how many
        of those failed.
        """
        before_ok, before_failed = self.ticks_ok, self.ticks_failed
        self.adopt_registered()
        self._dispatch_due(self.clock.now())
        await self._drain()
        failed = self.ticks_failed - before_failed
        return {"ticked": self.ticks_ok - before_ok + failed, "failed": failed}

    async def run_until(self, t: float) -> None:
        """Drive a virtual clock to ``t``, running every tick that falls due on the way.

        Each tick completes before time moves on. Discovery is not run here;
        call :meth:`discover` explicitly.
        """
        set_time = getattr(self.clock, "set", None)
        if set_time is None:
            raise TypeError("run_until needs a VirtualClock")
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > t:
                set_time(max(t, self.clock.now()))
                return
            set_time(max(deadline, self.clock.now()))
            self._dispatch_due(self.clock.now())
            await self._drain()

    async def start(self) -> None:
        """Run the loop (discovery + ticks) until :meth:`stop` is called.

        Worlds registered on the scheduler by hand (before, or while it runs)
        are run along with the ones discovery finds (:meth:`adopt_registered`).
        """
        self.adopt_registered()
        self._next_discovery = self.clock.now()
        log.info(
            "scheduler_loop_started",
            max_concurrent_ticks=self.limits.max_concurrent_ticks,
            phase_slot_seconds=self.limits.phase_slot_seconds,
            tick_timeout_seconds=self.limits.tick_timeout_seconds,
            discovery_interval_seconds=self.limits.discovery_interval_seconds,
        )
        loop = asyncio.get_running_loop()
        discovery: asyncio.Task[None] | None = None
        keeper = asyncio.create_task(self._keep_leases(), name="lease-renewal") if self.leases is not None else None
        try:
            while not self._stopping:
                now = self.clock.now()
                self.progress += 1
                if (discovery is None or discovery.done()) and now >= (self._next_discovery or now):
                    discovery = asyncio.create_task(self._discover_safely(), name="discovery")
                    self._next_discovery = now + self.limits.discovery_interval_seconds
                if not self._pumping:
                    self._pumping = True
                    self._pump()
                wake_at = now + self.idle_wake_seconds
                if self._next_discovery is not None:
                    wake_at = min(wake_at, self._next_discovery)
                # Never a busy loop on a discovery still running.
                wake_at = max(wake_at, now + self.limits.batch_window_seconds)
                self._wake = loop.create_future()
                self._timer = self.clock.call_at(wake_at, self._poke)
                try:
                    await self._wake
                finally:
                    self._timer.cancel()
                    self._wake = None
        finally:
            self._pumping = False
            if self._tick_timer is not None:
                self._tick_timer.cancel()
                self._tick_timer, self._tick_timer_at = None, math.inf
            for task in (discovery, keeper):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._inflight:
                log.info("inflight_ticks_waiting", batches=len(self._inflight), queued=len(self._ready))
            await self._drain()
            # Reset only now: a stop() before the loop began (a signal) must not be lost, and start() may run again.
            self._stopping = False
            log.info("scheduler_loop_stopped", ticks_ok=self.ticks_ok, ticks_failed=self.ticks_failed)

    def stop(self) -> None:
        """Stop starting new ticks; :meth:`start` returns once in-flight ticks finish (at once if called before it)."""
        self._stopping = True
        self._poke()

    async def _drain(self) -> None:
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def shutdown(self, worlds: Iterable[int] | None = None) -> None:
        """Unregister worlds (all by default) after the loop has stopped.

        With leases and no explicit ``worlds``, also releases every lease and
        removes this instance's heartbeat so peers take over at once.
        """
        for world_id in list(worlds if worlds is not None else self._slots):
            await self.remove_world(world_id)
        if worlds is None and self.leases is not None:
            await self.leases.leave()

    def get_stats(self) -> dict[str, Any]:
        """Runner-level stats plus every world's context stats and isolated worlds."""
        stats = self.scheduler.get_stats()
        stats.update(
            ticks_ok=self.ticks_ok,
            ticks_failed=self.ticks_failed,
            in_flight=sum(1 for slot in self._slots.values() if slot.in_flight),
            leases=self.leases.stats() if self.leases is not None else None,
            broken_worlds={
                wid: {"config_version": b.config_version, "error": b.error} for wid, b in self.broken.items()
            },
        )
        return stats

    def ticks_problem(self) -> str | None:
        """Why ticks are not committing (``/readyz``); ``None`` while they commit or no world is registered.

        Without worlds no tick can commit or fail, so an old failure (of a
        world since dropped) says nothing about the database any more.
        """
        return self.commits.problem(self.clock.now()) if self._slots else None

    def _count_db_error(self, exc: BaseException, operation: str) -> None:
        if self.observer is not None and is_database_error(exc):
            self.observer.db_error(operation)
