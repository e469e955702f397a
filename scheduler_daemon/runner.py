"""``SchedulerLoopRunner``: ticks every registered world at its own rate.

One deadline queue for all worlds on the monotonic clock (no polling). Each
world runs on a fixed-rate grid ``anchor + k × tickIntervalSeconds``; a tick
that starts late covers the real time that elapsed (the scheduler advances
world time by it), slots that passed without a tick are skipped and counted,
never replayed in a burst. At most one tick per world is in flight.

Due worlds are ticked in batches: wakeups are coalesced over
``batch_window_seconds``, and up to ``max_concurrent_ticks`` batch workers
each hand up to ``max_batch_size`` worlds to ``WorldScheduler.tick_worlds``,
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
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import structlog

from scheduler_daemon.clock import Clock, MonotonicClock, TimerHandle
from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.deadlines import DeadlineWheel, Entry
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.retry import first_line, retry_after, retry_transient
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.settings import SchedulerSettings
from scheduler_daemon.simulation.tiers import NO_SESSIONS_FINGERPRINT
from scheduler_daemon.store.errors import error_class, is_database_error, is_transient
from scheduler_daemon.store.leases import Lease, LeaseLostError
from scheduler_daemon.store.repository import ActiveSessions, StaleWorldStateError, WorldRecord

log = structlog.get_logger("scheduler_daemon.runner")

# Wake at least this often even with nothing due, so "the loop is alive"
# (watchdog progress) never depends on having worlds.
_IDLE_WAKE_SECONDS = 1.0
_DISCOVERY_YIELD_EVERY = 500
#: Worlds registered per transaction (one statement of each kind for all of them).
_REGISTER_CHUNK = 250
#: An isolated world is tried again this often even if its config version did not move
#: (a fix of its state row or of a value the version does not cover).
BROKEN_RETRY_SECONDS = 30.0
# Smallest batch a dispatch is split into to spread it over the workers: below
# it a batch's fixed statements (due NPCs, backlog, clock moves, savepoint,
# COMMIT) weigh more than the overlap of batches gains.
_MIN_SPLIT_BATCH = 16
_T = TypeVar("_T")
# A transient database error (disconnect, serialization failure) re-runs the
# whole tick this many times in all, within the tick timeout, before the world
# is backed off; discovery likewise.
_UNIT_ATTEMPTS = 3


async def _in_chunks(items: list[_T]) -> AsyncIterator[list[_T]]:
    """``items`` in chunks of ``_DISCOVERY_YIELD_EVERY``, letting due ticks run between chunks.

    A scan of every registered world in one go blocked the loop for 15-20 ms
    at 10,000 worlds on each discovery pass: the tail of the core
    benchmark's tick lag.
    """
    for start in range(0, len(items), _DISCOVERY_YIELD_EVERY):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + _DISCOVERY_YIELD_EVERY]


def _touched_database(result: TickResult) -> bool:
    # A paused world whose clock did not move ticks without a transaction.
    return not result.paused or result.delta_game_seconds != 0.0


class _FifoGate:
    """What a FIFO lock and a FIFO semaphore share: waiters queue, the uncontended acquire is a plain call.

    :meth:`try_acquire` takes the gate without a coroutine or a future; only
    when it fails does :meth:`acquire` queue a future, which the subclass's
    :meth:`release` resolves to hand the gate over (at 10,000 ticks a second,
    ``asyncio.Lock``'s and ``asyncio.Semaphore``'s coroutines were measurable).
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands the gate over by resolving it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            elif waiter in self._waiters:  # release() may have dropped it already
                self._waiters.remove(waiter)
            raise

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _ResizableLimit(_FifoGate):
    """A FIFO semaphore whose limit a reload can change while permits are held.

    Raising the limit adds permits at once; lowering it is paid back by the
    next releases, so in-flight ticks keep the permits they hold and the
    running count converges to the new limit without cancelling anything.
    """

    __slots__ = ("_free", "limit")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._free = limit  # negative after the limit was lowered below the permits held

    @property
    def free(self) -> int:
        """Permits no batch holds (negative while a lowered limit is paid back)."""
        return self._free

    def resize(self, limit: int) -> None:
        self._free += limit - self.limit
        self.limit = limit
        self._hand_over()

    def try_acquire(self) -> bool:
        """Take a permit if one is free and nobody is queued for it."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def release(self) -> None:
        self._free += 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._free -= 1
                waiter.set_result(None)


class _SlotLock(_FifoGate):
    """A FIFO lock: serialises a world's loop tick with its config reload, forced tick, tier refresh and removal.

    Those are rare, so the loop's ticks take it with :meth:`try_acquire` and
    wait with :meth:`acquire` only when it is held.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        super().__init__()
        self._held = False

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        """Take the lock if it is free and nobody is queued for it."""
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    def release(self) -> None:
        """Hand the lock to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # stays held: ownership moves to the waiter
                return
        self._held = False


class WorldSource(Protocol):
    """What discovery reads: the worlds that should run, and every active session."""

    async def discover_active_worlds(self) -> dict[int, int]: ...

    async def active_session_views(self) -> ActiveSessions: ...


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


class TickCommits:
    """Whether ticks commit: what readiness reports, since ``SELECT 1`` works on a database that refuses writes.

    The runner records each tick that touched the database: a commit, or a
    failure with a database error. Ticks are failing while the latest of
    those was a failure, i.e. from the first such failure after a commit
    until the next commit. Times are on the runner's clock.
    """

    __slots__ = ("error", "failing_since", "last_commit_at")

    def __init__(self) -> None:
        self.last_commit_at: float | None = None
        #: The first tick failed by a database error since the last commit (``None``: not failing).
        self.failing_since: float | None = None
        #: The error class of the latest such failure.
        self.error = ""

    def committed(self, at: float) -> None:
        """A tick committed at ``at``."""
        self.last_commit_at = at
        self.failing_since = None

    def failed(self, at: float, exc: BaseException) -> None:
        """A tick failed at ``at`` with the database error ``exc``."""
        if self.failing_since is None:
            self.failing_since = at
        self.error = error_class(exc)

    def problem(self, now: float) -> str | None:
        """Why ticks are not committing (``None`` while the latest tick that touched the database committed)."""
        if self.failing_since is None:
            return None
        last = "no commit yet" if self.last_commit_at is None else f"last commit {now - self.last_commit_at:.0f} s ago"
        return f"ticks failing: {self.error} since {now - self.failing_since:.0f} s ({last})"


class _BatchTimeouts:
    """The tick timeout of every in-flight batch on one loop timer.

    ``asyncio.timeout`` arms and cancels a loop timer per batch, about 5 µs,
    a tenth of a whole batch's cost at 10,000 worlds. Batches share one
    timeout length, so their deadlines arrive in start order: one timer armed
    for the earliest is re-armed only when it fires. The semantics are
    ``asyncio.timeout``'s: at its deadline the batch's task is cancelled, and
    the cancellation leaves the scope as :class:`TimeoutError` unless the
    task was also cancelled from outside (stop, shutdown).
    """

    __slots__ = ("_scopes", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._scopes: dict[_TimeoutScope, None] = {}  # in flight, in start order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def scope(self, seconds: float) -> _TimeoutScope:
        """A ``with`` block that times out after ``seconds`` of loop time."""
        return _TimeoutScope(self, seconds)

    def _enter(self, scope: _TimeoutScope) -> None:
        self._scopes[scope] = None
        if scope.deadline < self._timer_at:  # only when the timeout was shortened (reload) or none is armed
            self._arm(scope.deadline)

    def _exit(self, scope: _TimeoutScope) -> None:
        self._scopes.pop(scope, None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = asyncio.get_running_loop().time()
        earliest = math.inf
        for scope in list(self._scopes):
            if scope.deadline <= now:
                del self._scopes[scope]
                scope.expired = True
                scope.task.cancel()
            else:
                earliest = min(earliest, scope.deadline)
        if earliest < math.inf:
            self._arm(earliest)


class _TimeoutScope:
    __slots__ = ("_cancelling", "_owner", "deadline", "expired", "task")

    def __init__(self, owner: _BatchTimeouts, seconds: float) -> None:
        self._owner = owner
        task = asyncio.current_task()
        assert task is not None, "a timeout scope needs a running task"
        self.task = task
        self._cancelling = task.cancelling()
        self.deadline = asyncio.get_running_loop().time() + seconds
        self.expired = False

    def __enter__(self) -> _TimeoutScope:
        self._owner._enter(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._owner._exit(self)
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


@dataclass(slots=True)
class _Slot:
    """Scheduling state of one registered world."""

    world_id: int
    ctx: WorldSimulationContext  # the scheduler's context of this registration (updated in place)
    interval: float
    anchor: float  # start of the fixed-rate grid
    k: int  # index of the next slot on the grid
    last_tick_at: float  # monotonic time the committed world time corresponds to
    lock: _SlotLock = field(default_factory=_SlotLock)
    generation: int = 0  # bumps invalidate stale deadline entries
    failures: int = 0
    retry_at: float | None = None  # backoff deadline after a failure
    in_flight: bool = False
    removed: bool = False
    tiers_at: float = 0.0  # clock time of the last tier assignment
    solo: bool = False  # its last batch failed as a whole: tick alone until a tick succeeds

    @property
    def deadline(self) -> float:
        return self.retry_at if self.retry_at is not None else self.anchor + self.k * self.interval


@dataclass(slots=True)
class BrokenWorld:
    """A world that could not be registered (an unusable stored row, invalid config or behaviour)."""

    world_id: int
    config_version: int
    error: str
    retry_at: float = math.inf  # clock time of the next registration attempt without a version change


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """The runner's tunables (``[scheduler]`` settings); reloadable through :meth:`SchedulerLoopRunner.set_limits`."""

    max_concurrent_ticks: int = 16
    max_batch_size: int = 64
    batch_window_seconds: float = 0.0015
    tick_timeout_seconds: float = 10.0
    discovery_interval_seconds: float = 5.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    tier_refresh_max_seconds: float = 60.0

    @classmethod
    def from_settings(cls, scheduler: SchedulerSettings) -> RunnerLimits:
        """The limits a ``[scheduler]`` section sets."""
        return cls(
            max_concurrent_ticks=scheduler.max_concurrent_ticks,
            max_batch_size=scheduler.max_batch_size,
            batch_window_seconds=scheduler.batch_window_seconds,
            tick_timeout_seconds=scheduler.tick_timeout_seconds,
            discovery_interval_seconds=scheduler.discovery_interval_seconds,
            backoff_max_seconds=scheduler.backoff_max_seconds,
            tier_refresh_max_seconds=scheduler.tier_refresh_max_seconds,
        )


class SchedulerLoopRunner:
    """Runs the scheduler loop for all registered worlds.

    ``start()`` runs until ``stop()``; ``run_once()`` ticks every due world
    once and returns (cron-style use, tests). ``run_until(t)`` drives a
    :class:`~scheduler_daemon.clock.VirtualClock` deterministically.
    """

    def __init__(
        self,
        scheduler: WorldScheduler,
        *,
        clock: Clock | None = None,
        limits: RunnerLimits | None = None,
        observer: TickObserver | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.scheduler = scheduler
        #: Where discovery reads which worlds should run and their sessions.
        self.worlds: WorldSource = scheduler.store
        self.leases = leases
        self.clock: Clock = clock or MonotonicClock()
        limits = limits or RunnerLimits()
        self.limits = limits
        self.max_concurrent_ticks = limits.max_concurrent_ticks
        self.max_batch_size = limits.max_batch_size
        self.batch_window_seconds = limits.batch_window_seconds
        self.tick_timeout_seconds = limits.tick_timeout_seconds
        self.discovery_interval_seconds = limits.discovery_interval_seconds
        self.backoff_base_seconds = limits.backoff_base_seconds
        self.backoff_max_seconds = limits.backoff_max_seconds
        self.tier_refresh_max_seconds = limits.tier_refresh_max_seconds
        self.observer = observer
        self.broken: dict[int, BrokenWorld] = {}
        self.progress = 0  # increases while the loop works (watchdog feed)
        #: Longest sleep of the loop with nothing due; the daemon lowers it under a
        #: short systemd watchdog so an idle loop still shows progress in time.
        self.idle_wake_seconds = _IDLE_WAKE_SECONDS
        #: Set once the first discovery pass has finished (successfully or not).
        self.discovered = asyncio.Event()
        #: (worlds registered, worlds to register) of the current discovery pass.
        self.registration = (0, 0)
        self.ticks_ok = 0
        self.ticks_failed = 0
        #: Commits and database failures of ticks (``/readyz``).
        self.commits = TickCommits()
        self._slots: dict[int, _Slot] = {}
        # (deadline, world_id, generation) entries, bucketed by millisecond.
        self._deadlines = DeadlineWheel()
        self._ready: deque[tuple[_Slot, float]] = deque()  # due worlds waiting for a batch worker
        self._ready_alone = 0  # of them, worlds that tick in a batch of their own
        self._workers = 0  # batch workers running (each holds at most one transaction)
        self._limit = _ResizableLimit(limits.max_concurrent_ticks)  # batches holding a transaction
        self._timeouts = _BatchTimeouts()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._wake: asyncio.Future[None] | None = None
        self._timer: TimerHandle | None = None  # wakes the loop task (discovery, idle)
        # While start() runs, a timer callback dispatches ticks (no task wakeup per window).
        self._pumping = False
        self._tick_timer: TimerHandle | None = None
        self._tick_timer_at = math.inf
        self._next_discovery: float | None = None

    # --------------------------------------------------------- configuration
    def set_limits(self, limits: RunnerLimits) -> None:
        """Apply reloaded limits; batches in flight finish under the old ones."""
        if limits.max_concurrent_ticks != self.max_concurrent_ticks:
            self._limit.resize(limits.max_concurrent_ticks)
        discovery_moved = limits.discovery_interval_seconds != self.discovery_interval_seconds
        self.limits = limits
        self.max_concurrent_ticks = limits.max_concurrent_ticks
        self.max_batch_size = limits.max_batch_size
        self.batch_window_seconds = limits.batch_window_seconds
        self.tick_timeout_seconds = limits.tick_timeout_seconds
        self.discovery_interval_seconds = limits.discovery_interval_seconds
        self.backoff_base_seconds = limits.backoff_base_seconds
        self.backoff_max_seconds = limits.backoff_max_seconds
        self.tier_refresh_max_seconds = limits.tier_refresh_max_seconds
        if discovery_moved:
            self._next_discovery = self.clock.now()
            self._poke()

    # ------------------------------------------------------------- registry
    @property
    def world_ids(self) -> list[int]:
        return sorted(self._slots)

    async def add_world(self, world_id: int, *, first_deadline: float | None = None) -> None:
        """Register a world with the scheduler and schedule its first tick.

        The first tick is due one interval from now, or at ``first_deadline``
        (on this runner's clock) to spread worlds over the interval. With
        leases, only a world whose lease we hold is registered. Raises what
        :meth:`~scheduler_daemon.scheduler.WorldScheduler.register_world` raises.
        """
        failed = await self.add_worlds([world_id], first_deadline=first_deadline)
        if world_id in failed:
            raise failed[world_id]

    async def add_worlds(
        self, world_ids: Sequence[int], *, first_deadline: float | None = None
    ) -> dict[int, Exception]:
        """Register several worlds in one transaction and schedule them; returns the ones that failed.

        A world that cannot be registered (its error names it and the field)
        is left out and returned; the others are registered.
        """
        requests: list[tuple[int, Lease | None]] = []
        for world_id in world_ids:
            lease = self.leases.lease_for(world_id) if self.leases is not None else None
            if self.leases is not None and lease is None:
                # Lost (or given up) while discovery was busy: never tick a world unfenced.
                log.info("world not registered: its lease is no longer ours", world_id=world_id)
                continue
            requests.append((world_id, lease))
        if not requests:
            return {}
        answers = await self.scheduler.register_worlds(requests)
        failed: dict[int, Exception] = {}
        now = self.clock.now()
        for world_id, answer in answers.items():
            if isinstance(answer, Exception):
                failed[world_id] = answer
                continue
            interval = answer.config.tick_interval_seconds
            anchor = now if first_deadline is None else first_deadline - interval
            slot = _Slot(world_id, answer, interval=interval, anchor=anchor, k=1, last_tick_at=now, tiers_at=now)
            old = self._slots.get(world_id)
            if old is not None:
                old.removed = True
            self._slots[world_id] = slot
            self.broken.pop(world_id, None)
            self._push(slot)
            if self.observer:
                self.observer.world_registered(world_id)
        return failed

    async def remove_world(self, world_id: int) -> None:
        """Stop ticking a world (waits for its in-flight tick) and unregister it."""
        slot = self._slots.pop(world_id, None)
        if slot is None:
            return
        slot.removed = True
        async with slot.lock:
            await self.scheduler.unregister_world(world_id)
        if self.observer:
            self.observer.world_unregistered(world_id)

    async def apply_world_config(self, world_id: int, record: WorldRecord | None = None) -> None:
        """Re-read a world's config now (or apply ``record``, just written); takes effect before its next tick.

        Waits for an in-flight tick of that world first so the elapsed part of
        the interval accrues at the old scale exactly once.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            return
        async with slot.lock:
            now = self.clock.now()
            ctx = await self.scheduler.reload_world(
                world_id, elapsed_real_since_tick=now - slot.last_tick_at, record=record
            )
            new_interval = ctx.config.tick_interval_seconds
            if new_interval != slot.interval:
                # Re-anchor the grid at the last tick so the new rate starts from it.
                slot.interval = new_interval
                slot.anchor = slot.last_tick_at
                slot.k = 1
                if not slot.in_flight:
                    self._push(slot)

    async def force_tick(self, world_id: int, delta_real_seconds: float) -> TickResult:
        """Tick one registered world now, covering ``delta_real_seconds`` of real time.

        For the admin API: an extra tick on top of the world's grid (its next
        regular tick still covers the real time since the previous regular
        one). Holds the world's lock, so it never overlaps a loop tick.
        Raises :class:`~scheduler_daemon.scheduler.WorldNotRegisteredError`.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            raise WorldNotRegisteredError(world_id)
        async with slot.lock:
            if slot.removed:
                raise WorldNotRegisteredError(world_id)
            started = self.clock.now()
            try:
                result = await self.scheduler.tick_world(world_id, delta_real_seconds)
            except Exception as exc:
                self._tick_failed(exc)
                if self.observer:
                    # No slot was scheduled, so there is no lag to report (NaN).
                    self.observer.tick_finished(world_id, "error", math.nan, self.clock.now() - started, None)
                raise
            self.progress += 1
            if _touched_database(result):
                self.commits.committed(self.clock.now())
            if self.observer:
                self.observer.tick_finished(world_id, "ok", math.nan, self.clock.now() - started, result)
            return result

    async def discover(self) -> None:
        """Register newly active worlds, drop inactive ones, pick up config changes.

        New worlds are registered in chunks of ``_REGISTER_CHUNK`` (one
        transaction each); :attr:`registration` tells how far the pass got.
        A world that cannot be registered is isolated (:attr:`broken`) with
        the reason, logged once, and tried again when its config version moves
        or after ``BROKEN_RETRY_SECONDS``.
        """
        active = await self.worlds.discover_active_worlds()
        if self.leases is not None:
            active = await self._balance(active)
        for world_id in sorted(self._slots.keys() - active.keys()):
            await self.remove_world(world_id)
        for world_id in self.broken.keys() - active.keys():
            del self.broken[world_id]
        # Only worlds that are new, or whose version moved, are looked at one
        # by one; the registered worlds are compared in chunks with due ticks
        # running between them.
        broken, now = self.broken, self.clock.now()
        new = sorted(
            w
            for w in active.keys() - self._slots.keys()
            if w not in broken or broken[w].config_version != active[w] or now >= broken[w].retry_at
        )
        changed: list[int] = []
        async for chunk in _in_chunks(list(self._slots.items())):
            changed += (w for w, s in chunk if s.ctx.config_version != active.get(w, s.ctx.config_version))
        self.registration = (0, len(new))
        for start in range(0, len(new), _REGISTER_CHUNK):
            batch = new[start : start + _REGISTER_CHUNK]
            for world_id, exc in (await self.add_worlds(batch)).items():
                self._isolate(world_id, active[world_id], exc)
            self.registration = (min(start + _REGISTER_CHUNK, len(new)), len(new))
            await asyncio.sleep(0)
        for n, world_id in enumerate(sorted(changed), 1):
            if n % _DISCOVERY_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            slot = self._slots.get(world_id)
            if slot is None or slot.ctx.config_version == active[world_id]:
                continue
            try:
                await self.apply_world_config(world_id)
            except (ValueError, LookupError) as exc:
                # Invalid stored config/behaviour: isolate this world only.
                await self.remove_world(world_id)
                self._isolate(world_id, active[world_id], exc)
        await self.refresh_tiers()

    def _isolate(self, world_id: int, version: int, exc: Exception) -> None:
        """Keep a world that cannot run out of ticking, with its reason; logged once per reason."""
        error = str(exc)
        before = self.broken.get(world_id)
        self.broken[world_id] = BrokenWorld(world_id, version, error, self.clock.now() + BROKEN_RETRY_SECONDS)
        if before is None or before.error != error:
            log.error("world isolated", world_id=world_id, config_version=version, error=error)

    async def refresh_tiers(self) -> list[int]:
        """Recompute tiers of the registered worlds whose tier inputs changed.

        One query reads every world's active sessions; a world is recomputed
        only if its sessions' fingerprint changed or a decision moved an NPC
        to or from a place tiering looks at (see
        :meth:`~scheduler_daemon.scheduler.WorldScheduler.tiers_outdated`), so
        an unchanged world costs nothing. Runs with discovery, i.e. at most
        every ``discovery_interval_seconds``. Independently, every world is
        recomputed at least every ``tier_refresh_max_seconds``: that picks up
        what no fingerprint sees (NPCs added, removed or re-homed by the game
        backend). Returns the worlds recomputed.
        """
        read = await self.worlds.active_session_views()
        self.scheduler.note_ignored_sessions(read.ignored)
        sessions = read.views
        refreshed: list[int] = []
        now, max_age = self.clock.now(), self.tier_refresh_max_seconds
        # A cheap superset of the worlds to recompute first (nobody online, no
        # NPC moved, not due periodically: nothing to do), as in discover().
        candidates: list[int] = []
        async for chunk in _in_chunks(list(self._slots.items())):
            candidates += (
                w
                for w, s in chunk
                if w in sessions
                or now - s.tiers_at >= max_age
                or s.ctx.tiers_stale
                or s.ctx.sessions_fingerprint != NO_SESSIONS_FINGERPRINT
            )
        candidates.sort()
        for n, world_id in enumerate(candidates, 1):
            if n % _DISCOVERY_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # as in discover(): due ticks run between chunks
            slot = self._slots.get(world_id)
            if slot is None:
                continue  # removed meanwhile
            views = sessions.get(world_id, [])
            periodic = self.clock.now() - slot.tiers_at >= max_age
            if slot.removed or not (periodic or self.scheduler.tiers_outdated(world_id, views)):
                continue
            try:
                async with slot.lock:  # never concurrently with this world's tick
                    if slot.removed:
                        continue
                    await self.scheduler.refresh_tiers(world_id, views)
                    slot.tiers_at = self.clock.now()
                refreshed.append(world_id)
            except Exception as exc:
                # Keeps the old tiers; retried at the next discovery.
                log.error("tier assignment failed", world_id=world_id, error=f"{type(exc).__name__}: {exc}")
        return refreshed

    # --------------------------------------------------------------- leases
    async def _balance(self, active: dict[int, int]) -> dict[int, int]:
        """Heartbeat, give up inactive and surplus worlds, claim up to the fair share.

        Returns the active worlds whose lease we hold: the ones to tick.
        """
        keeper = self.leases
        assert keeper is not None
        await keeper.heartbeat()
        gone = [w for w in keeper.held if w not in active]
        if gone:
            await self._give_up(gone, reason="inactive")
        share = keeper.compute_fair_share(len(active))
        surplus = keeper.leases_held - share
        if surplus > 0:
            # Shed at a tick boundary: remove_world waits for an in-flight tick.
            # Idle and isolated worlds go first, then the highest ids.
            order = sorted(keeper.held, key=lambda w: (w not in self.broken, self._is_in_flight(w), -w))
            await self._give_up(order[:surplus], reason="surplus")
        elif surplus < 0:
            await keeper.claim([w for w in active if w not in keeper.held], -surplus)
        return {w: v for w, v in active.items() if w in keeper.held}

    def _is_in_flight(self, world_id: int) -> bool:
        slot = self._slots.get(world_id)
        return slot is not None and slot.in_flight

    async def _give_up(self, world_ids: list[int], *, reason: str) -> None:
        assert self.leases is not None
        for world_id in world_ids:
            await self.remove_world(world_id)
            self.broken.pop(world_id, None)
        await self.leases.release(world_ids, reason=reason)

    async def _lose_world(self, world_id: int, reason: str) -> None:
        """Another instance owns the world now: stop ticking it (after an in-flight tick)."""
        assert self.leases is not None
        if self.leases.forget_lost(world_id, reason):
            self.broken.pop(world_id, None)
            await self.remove_world(world_id)

    async def _drop_lost_in_tick(self, slot: _Slot, reason: str) -> None:
        """Drop a world whose lease was lost, from inside its own tick (the slot lock is held)."""
        assert self.leases is not None
        self.leases.forget_lost(slot.world_id, reason)
        slot.removed = True
        if self._slots.get(slot.world_id) is slot:
            del self._slots[slot.world_id]
            await self.scheduler.unregister_world(slot.world_id)
            if self.observer:
                self.observer.world_unregistered(slot.world_id)

    async def _keep_leases(self) -> None:
        """Background task: heartbeat and renew every TTL/3; drop worlds whose lease was lost."""
        keeper = self.leases
        assert keeper is not None
        while True:
            await self.clock.sleep_until(self.clock.now() + keeper.renew_interval_seconds)
            try:
                await keeper.heartbeat()
                lost = await keeper.renew()
            except Exception as exc:
                # Keep ticking: the leases are still ours until the TTL runs
                # out, and the fence stops our writes once someone else claims.
                log.error("lease renewal failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                continue
            for world_id in lost:
                await self._lose_world(world_id, reason="renewal")

    # ------------------------------------------------------------ deadlines
    def _push(self, slot: _Slot, deadline: float | None = None) -> None:
        """Queue the slot's next tick (its own deadline by default), moving the tick timer if it comes first."""
        if deadline is None:
            deadline = slot.deadline
        slot.generation += 1
        self._deadlines.push(deadline, slot.world_id, slot.generation)
        if deadline < self._tick_timer_at:
            self._arm_ticks(deadline)

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _arm_ticks(self, at: float) -> None:
        """(Re)arm the tick timer for ``at`` (only while :meth:`start` runs)."""
        if not self._pumping:
            return
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        self._tick_timer = self.clock.call_at(at, self._pump)
        self._tick_timer_at = at

    def _pump(self) -> None:
        """Tick timer: dispatch what is due within the batch window, re-arm for the next deadline.

        A plain timer callback rather than the loop task waking up: at 10,000
        worlds a task wakeup per window (a future, a loop iteration) cost
        more than the dispatch itself.
        """
        self._tick_timer, self._tick_timer_at = None, math.inf
        if self._stopping:
            return
        now = self.clock.now()
        self.progress += 1
        self._dispatch_due(now, now + self.batch_window_seconds)
        following = self.next_deadline()
        if following is not None:
            # At most one dispatch per window: what falls due within it was just dispatched.
            self._arm_ticks(max(following, now + self.batch_window_seconds))

    def next_deadline(self) -> float | None:
        """Earliest pending tick deadline (stale entries dropped)."""
        return self._deadlines.earliest(self._is_current)

    def _is_current(self, entry: Entry) -> bool:
        slot = self._slots.get(entry[1])
        return slot is not None and not slot.removed and slot.generation == entry[2] and not slot.in_flight

    def _dispatch_due(self, now: float, horizon: float | None = None) -> list[asyncio.Task[None]]:
        """Queue every world due by ``horizon`` (default ``now``), start batch workers; returns them.

        The loop passes ``now + batch_window_seconds``: worlds falling due
        within the window join this batch slightly early instead of each
        costing a wakeup and a batch of their own (their world time still
        covers exactly the real time elapsed, and their grid is unchanged).
        """
        slots, ready = self._slots, self._ready
        for scheduled, wid, gen in self._deadlines.pop_due(now if horizon is None else horizon):
            slot = slots.get(wid)
            if slot is None or slot.removed or slot.generation != gen or slot.in_flight:
                continue  # stale entry
            if slot.retry_at is None and now >= scheduled + slot.interval:
                # Serve the latest slot that has started; the ones before it were missed.
                latest = max(slot.k, math.floor((now - slot.anchor) / slot.interval + 1e-9))
                missed = latest - slot.k
                if missed > 0:
                    self._count_missed(slot, missed)
                    slot.k = latest
                    scheduled = slot.deadline
            elif slot.retry_at is not None:
                # A retry after a failed tick (slot k, counted as failed): the
                # grid slots that started while the world was backed off passed
                # without a tick, except the latest one, which this retry serves.
                latest = max(slot.k + 1, math.floor((now - slot.anchor) / slot.interval + 1e-9))
                if latest - slot.k - 1 > 0:
                    self._count_missed(slot, latest - slot.k - 1)
                slot.k = latest
            slot.in_flight = True
            ready.append((slot, scheduled))
            if slot.solo or slot.failures:
                self._ready_alone += 1
        return self._spawn_workers()

    def _spawn_workers(self) -> list[asyncio.Task[None]]:
        # One task per batch of worlds, not per tick: at 10,000 worlds a task,
        # a timeout timer and a context switch per tick cost more than the
        # tick bookkeeping itself. Workers drain the ready queue; worlds that
        # become due while every worker is busy wait and join the next batch
        # (group commit: the busier the database, the bigger the batches).
        tasks: list[asyncio.Task[None]] = []
        # A world that ticks alone is a batch of its own: one worker each, so the
        # neighbours of a hung world, retried alone after their shared batch
        # timed out, do not wait for its retry to time out again.
        alone = self._ready_alone
        wanted = alone + -(-(len(self._ready) - alone) // self._batch_size())
        while self._ready and self._workers < self.max_concurrent_ticks and len(tasks) < wanted:
            self._workers += 1
            task = asyncio.create_task(self._work(), name="tick-batch")
            self._inflight.add(task)
            tasks.append(task)
        return tasks

    def _batch_size(self) -> int:
        """How many queued worlds one batch takes.

        The queue is spread over the transaction permits no batch holds (a
        worker takes its permit as soon as it has taken its batch), so that
        several batches overlap: one deciding in Python while another's
        statements run in the database. (With all 64 worlds of the e2e
        benchmark in one batch, the daemon and PostgreSQL took turns, each idle
        half the time.) Never below ``_MIN_SPLIT_BATCH`` worlds, nor above
        ``max_batch_size``.
        """
        spread = -(-len(self._ready) // max(self._limit.free, 1))
        return min(self.max_batch_size, max(_MIN_SPLIT_BATCH, spread))

    def _take_batch(self) -> list[tuple[_Slot, float]]:
        """Up to :meth:`_batch_size` queued worlds; a world that failed last time goes alone.

        A world recovering from failures (or timeouts) ticks in a batch of its
        own, so one that keeps failing cannot take its neighbours' shared
        transaction down with it more than once.
        """
        size = self._batch_size()
        first = self._ready.popleft()
        batch = [first]
        if first[0].failures or first[0].solo:
            self._ready_alone -= 1
            return batch
        while self._ready and len(batch) < size and not (self._ready[0][0].failures or self._ready[0][0].solo):
            batch.append(self._ready.popleft())
        return batch

    async def _work(self) -> None:
        try:
            while self._ready:
                await self._tick_batch(self._take_batch())
        finally:
            self._workers -= 1
            # Not a done callback: that would cost the loop another iteration per batch.
            task = asyncio.current_task()
            if task is not None:
                self._inflight.discard(task)

    def _count_missed(self, slot: _Slot, missed: int) -> None:
        if not slot.removed:
            slot.ctx.record_skipped(missed)
        if self.observer:
            self.observer.ticks_missed(slot.world_id, missed)
        log.debug("tick slots missed", world_id=slot.world_id, missed=missed)

    # ----------------------------------------------------------------- tick
    async def _tick_batch(self, batch: list[tuple[_Slot, float]]) -> None:
        """Tick a batch of worlds in one call of ``scheduler.tick_worlds`` (one grouped commit).

        Each world keeps its own outcome: the scheduler commits every world
        that succeeded and rolls back only the ones that failed. A transient
        database error of the whole unit (serialization failure, lost
        connection) re-runs it, within the timeout. A timeout or another
        failure of the shared commit fails the whole batch (nothing of it was
        applied) without saying which world caused it: the worlds of such a
        batch are retried at once, each alone, so only the culprit fails its
        own tick and backs off while its neighbours lose just that time.
        """
        n = len(batch)
        outcomes = ["skipped"] * n  # skipped: never started (removed or stopping)
        results: list[TickResult | None] = [None] * n
        locked: list[_Slot] = []
        started = self.clock.now()
        limit = self._limit
        holds_permit = False
        try:
            if not limit.try_acquire():
                await limit.acquire()
            holds_permit = True
            for slot, _ in batch:
                # Uncontended unless a config reload or removal of this world is in progress.
                if not slot.lock.try_acquire():
                    await slot.lock.acquire()
                locked.append(slot)
            if self._stopping:
                return  # queued ticks never start once stopping
            live: list[int] = []
            live_slots: list[_Slot] = []
            # A timeout can hit the post-commit generation hand-off, after
            # ticks were committed and applied (see the except below).
            applied_before: list[int] = []
            for i, (slot, _) in enumerate(batch):
                if not slot.removed:
                    live.append(i)
                    live_slots.append(slot)
                    outcomes[i] = "error"
                    applied_before.append(slot.ctx.ticks_processed)
            if not live:
                return
            started = self.clock.now()

            async def attempt() -> Sequence[TickResult | BaseException]:
                # Each attempt covers the real time up to its own start.
                nonlocal started
                started = now = self.clock.now()
                # The stamp (last_advanced_at) of that same moment, read before
                # anything can pause the process: read while planning, a pause
                # (a long GC) shifted the stamps of the worlds planned after it.
                wall = datetime.now(UTC)
                return await self.scheduler.tick_worlds(
                    [(slot.world_id, max(now - slot.last_tick_at, 0.0)) for slot in live_slots], wall_at=wall
                )

            answers: Sequence[TickResult | BaseException]
            try:
                with self._timeouts.scope(self.tick_timeout_seconds):
                    if self.leases is not None:
                        # Overdue renewal (loop frozen?) is only noted: the fenced
                        # tick itself checks owner+epoch in the database and renews.
                        for slot in live_slots:
                            self.leases.check_overdue(slot.world_id)
                    # The first attempt inlined (retry_transient's fast path, minus its call).
                    try:
                        answers = await attempt()
                    except Exception as exc:
                        if not is_transient(exc):
                            raise
                        answers = await retry_after(
                            exc,
                            "tick",
                            attempt,
                            max_attempts=_UNIT_ATTEMPTS,
                            multiplier=0.05,
                            max_wait=0.5,
                            world_ids=[slot.world_id for slot in live_slots],
                        )
            except Exception as exc:
                for slot, before in zip(live_slots, applied_before, strict=True):
                    if slot.ctx.ticks_processed > before:
                        # Committed and applied; only the hand-off was cut
                        # short. Its interval must not be counted twice.
                        slot.last_tick_at = started
                if len(live) > 1:
                    # One event for the batch (world_ids): which world caused it is not known yet.
                    log.error(
                        "tick failed",
                        world_ids=[slot.world_id for slot in live_slots],
                        error="timeout" if isinstance(exc, TimeoutError) else first_line(exc),
                        tick_timeout_seconds=self.tick_timeout_seconds,
                        retry="each world at once, alone",
                    )
                    for i, slot in zip(live, live_slots, strict=True):
                        outcomes[i] = "retry"
                        slot.solo = True
                    return
                if isinstance(exc, TimeoutError):
                    log.error(
                        "tick timed out",
                        world_id=live_slots[0].world_id,
                        tick_timeout_seconds=self.tick_timeout_seconds,
                    )
                answers = [exc]
            committed = False
            for i, slot, answer in zip(live, live_slots, answers, strict=True):
                if not isinstance(answer, BaseException):
                    outcomes[i] = "ok"
                    results[i] = answer
                    committed = committed or _touched_database(answer)
                    slot.last_tick_at = started
                    if self.leases is not None:
                        self.leases.renewed_by_tick(slot.world_id, started)
                elif isinstance(answer, LeaseLostError):
                    # Nothing was written (the fence failed first): drop the world at
                    # once, unless the fence failed only because its state row was deleted.
                    if await self._restored(slot):
                        continue
                    outcomes[i] = "lease_lost"
                    await self._drop_lost_in_tick(slot, reason="fence")
                elif isinstance(answer, TimeoutError):
                    outcomes[i] = "timeout"
                elif isinstance(answer, StaleWorldStateError):
                    log.error("tick refused: world state moved underneath", world_id=slot.world_id, error=str(answer))
                    await self._resync(slot)
                else:
                    log.error("tick failed", world_id=slot.world_id, exc_info=answer)
                    self._tick_failed(answer)
            if committed:
                # Recorded after the batch's failed worlds: the COMMIT that followed their rollback succeeded.
                self.commits.committed(self.clock.now())
        finally:
            if holds_permit:
                limit.release()
            for slot in locked:
                slot.lock.release()
            self._finish_batch(batch, outcomes, results, started)

    def _finish_batch(
        self, batch: list[tuple[_Slot, float]], outcomes: list[str], results: list[TickResult | None], started: float
    ) -> None:
        now = self.clock.now()
        duration = now - started
        observer = self.observer
        reschedule = not self._stopping
        deadlines = self._deadlines
        self.progress += 1
        for (slot, scheduled), outcome, result in zip(batch, outcomes, results, strict=True):
            slot.in_flight = False
            if slot.removed or outcome in ("skipped", "lease_lost"):
                continue  # a lost lease wrote nothing: not a failure, and the world is gone
            if outcome == "retry":
                # Its batch failed as a whole: tick again right away, alone.
                if reschedule:
                    self._push(slot, now)
                continue
            if observer:
                observer.tick_finished(slot.world_id, outcome, started - scheduled, duration, result)
            if outcome == "ok" and slot.retry_at is None and not slot.failures and not slot.solo:
                # The common case, inlined (10,000 worlds): next slot on the grid.
                self.ticks_ok += 1
                if reschedule:
                    slot.k += 1
                    # _push() inlined: a method call per tick shows at 10,000 worlds.
                    slot.generation += 1
                    deadline = slot.anchor + slot.k * slot.interval
                    deadlines.push(deadline, slot.world_id, slot.generation)
                    if deadline < self._tick_timer_at:
                        self._arm_ticks(deadline)  # due before the tick timer: it must move
                continue
            if outcome == "ok":
                self.ticks_ok += 1
            else:
                self.ticks_failed += 1
            if reschedule:
                self._reschedule(slot, ok=outcome == "ok", now=now)

    async def _restored(self, slot: _Slot) -> bool:
        try:
            return await self.scheduler.restore_missing_state(slot.world_id)
        except Exception as exc:
            log.error("world state row check failed", world_id=slot.world_id, error=first_line(exc))
            return False

    async def _resync(self, slot: _Slot) -> None:
        try:
            ctx = await self.scheduler.resync_world(slot.world_id)
        except Exception:
            log.exception("world resync failed", world_id=slot.world_id)
            return
        # A tick we saw fail had committed: the next tick starts where it
        # started, or its interval would be counted twice.
        slot.last_tick_at += ctx.adopted_real_seconds

    def _reschedule(self, slot: _Slot, *, ok: bool, now: float) -> None:
        if ok:
            slot.failures = 0
            slot.solo = False
            if slot.retry_at is not None:
                # Recovered from backoff: start a fresh grid from this tick.
                slot.retry_at = None
                slot.anchor, slot.k = slot.last_tick_at, 1
            else:
                # If the tick overran into later slots, dispatch serves the
                # latest one and counts the others as missed.
                slot.k += 1
        else:
            slot.failures += 1
            backoff = min(self.backoff_base_seconds * 2 ** (slot.failures - 1), self.backoff_max_seconds)
            slot.retry_at = now + max(backoff, slot.interval)
            log.warning("world backed off", world_id=slot.world_id, failures=slot.failures, retry_in_seconds=backoff)
        self._push(slot)

    # ----------------------------------------------------------------- loop
    async def run_once(self) -> dict[str, int]:
        """Tick every world whose deadline has arrived, once, and wait for them."""
        before_ok, before_failed = self.ticks_ok, self.ticks_failed
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
        """Run the loop (discovery + ticks) until :meth:`stop` is called."""
        self._stopping = False
        self._next_discovery = self.clock.now()
        log.info(
            "scheduler loop started",
            max_concurrent_ticks=self.max_concurrent_ticks,
            tick_timeout_seconds=self.tick_timeout_seconds,
            discovery_interval_seconds=self.discovery_interval_seconds,
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
                    self._next_discovery = now + self.discovery_interval_seconds
                if not self._pumping:
                    self._pumping = True
                    self._pump()
                wake_at = now + self.idle_wake_seconds
                if self._next_discovery is not None:
                    wake_at = min(wake_at, self._next_discovery)
                # Never a busy loop on a discovery still running.
                wake_at = max(wake_at, now + self.batch_window_seconds)
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
                log.info("waiting for in-flight ticks", batches=len(self._inflight), queued=len(self._ready))
            await self._drain()
            log.info("scheduler loop stopped", ticks_ok=self.ticks_ok, ticks_failed=self.ticks_failed)

    async def _discover_safely(self) -> None:
        try:
            await retry_transient("world discovery", self.discover, max_attempts=_UNIT_ATTEMPTS, max_wait=1.0)
        except Exception as exc:
            # A database outage must not stop the loop; worlds keep ticking (and
            # their own ticks will fail and back off if the database is gone).
            log.error("world discovery failed", error=first_line(exc))
            self._count_db_error(exc, "discovery")
        finally:
            self.discovered.set()

    def _count_db_error(self, exc: BaseException, operation: str) -> None:
        if self.observer is not None and is_database_error(exc):
            self.observer.db_error(operation)

    def ticks_problem(self) -> str | None:
        """Why ticks are not committing (``/readyz``); ``None`` while they commit or no world is registered.

        Without worlds no tick can commit or fail, so an old failure (of a
        world since dropped) says nothing about the database any more.
        """
        return self.commits.problem(self.clock.now()) if self._slots else None

    def _tick_failed(self, exc: BaseException) -> None:
        """A tick's final failure: a database error is counted and makes ticks "failing" for readiness."""
        if is_database_error(exc):
            self.commits.failed(self.clock.now(), exc)
            if self.observer is not None:
                self.observer.db_error("tick")

    def stop(self) -> None:
        """Stop starting new ticks; :meth:`start` returns once in-flight ticks finish."""
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
