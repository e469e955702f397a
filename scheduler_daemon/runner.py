"""``SchedulerLoopRunner``: ticks every registered world at its own rate.

One deadline heap for all worlds on the monotonic clock (no polling). Each
world runs on a fixed-rate grid ``anchor + k × tickIntervalSeconds``; a tick
that starts late covers the real time that elapsed (the scheduler advances
world time by it), slots that passed without a tick are skipped and counted,
never replayed in a burst. At most one tick per world is in flight, at most
``max_concurrent_ticks`` overall, each bounded by ``tick_timeout_seconds``.
A world whose tick fails is backed off exponentially; the others keep their
rate.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from scheduler_daemon.clock import Clock, MonotonicClock, TimerHandle
from scheduler_daemon.retry import first_line, retry_transient
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.store.errors import is_database_error
from scheduler_daemon.store.repository import StaleWorldStateError, WorldNotFoundError

log = structlog.get_logger("scheduler_daemon.runner")

# Wake at least this often even with nothing due, so "the loop is alive"
# (watchdog progress) never depends on having worlds.
_IDLE_WAKE_SECONDS = 1.0
# A transient database error (disconnect, serialization failure) re-runs the
# whole tick this many times in all, within the tick timeout, before the world
# is backed off; discovery likewise.
_UNIT_ATTEMPTS = 3


class _ResizableLimit:
    """A semaphore whose limit a reload can change while permits are held.

    Raising the limit adds permits at once; lowering it is paid back by the
    next releases, so in-flight ticks keep the permits they hold and the
    running count converges to the new limit without cancelling anything.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self._debt = 0  # releases to swallow after the limit was lowered

    def resize(self, limit: int) -> None:
        delta = limit - self.limit
        self.limit = limit
        while delta > 0 and self._debt > 0:
            self._debt -= 1
            delta -= 1
        for _ in range(delta):
            self._sem.release()
        self._debt += max(-delta, 0)

    async def __aenter__(self) -> None:
        await self._sem.acquire()

    async def __aexit__(self, *exc: object) -> None:
        if self._debt > 0:
            self._debt -= 1
        else:
            self._sem.release()


class TickObserver(Protocol):
    """Receives runner events (metrics implement this)."""

    def tick_finished(
        self, world_id: int, outcome: str, lag_seconds: float, duration_seconds: float, result: TickResult | None
    ) -> None: ...

    def ticks_missed(self, world_id: int, slots: int) -> None: ...

    def world_registered(self, world_id: int) -> None: ...

    def world_unregistered(self, world_id: int) -> None: ...

    def db_error(self, operation: str) -> None: ...


@dataclass(slots=True)
class _Slot:
    """Scheduling state of one registered world."""

    world_id: int
    interval: float
    anchor: float  # start of the fixed-rate grid
    k: int  # index of the next slot on the grid
    last_tick_at: float  # monotonic time the committed world time corresponds to
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = 0  # bumps invalidate stale heap entries
    failures: int = 0
    retry_at: float | None = None  # backoff deadline after a failure
    in_flight: bool = False
    removed: bool = False

    @property
    def deadline(self) -> float:
        return self.retry_at if self.retry_at is not None else self.anchor + self.k * self.interval


@dataclass(slots=True)
class BrokenWorld:
    """A world that could not be registered (invalid config or behaviour)."""

    world_id: int
    config_version: int
    error: str


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
        max_concurrent_ticks: int = 16,
        tick_timeout_seconds: float = 10.0,
        discovery_interval_seconds: float = 5.0,
        backoff_base_seconds: float = 1.0,
        backoff_max_seconds: float = 60.0,
        observer: TickObserver | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.clock: Clock = clock or MonotonicClock()
        self.max_concurrent_ticks = max_concurrent_ticks
        self.tick_timeout_seconds = tick_timeout_seconds
        self.discovery_interval_seconds = discovery_interval_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.observer = observer
        self.broken: dict[int, BrokenWorld] = {}
        self.progress = 0  # increases while the loop works (watchdog feed)
        #: Longest sleep of the loop with nothing due; the daemon lowers it under a
        #: short systemd watchdog so an idle loop still shows progress in time.
        self.idle_wake_seconds = _IDLE_WAKE_SECONDS
        #: Set once the first discovery pass has finished (successfully or not).
        self.discovered = asyncio.Event()
        self.ticks_ok = 0
        self.ticks_failed = 0
        self._slots: dict[int, _Slot] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (deadline, seq, world_id, generation)
        self._seq = itertools.count()
        self._limit = _ResizableLimit(max_concurrent_ticks)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._wake: asyncio.Future[None] | None = None
        self._timer: TimerHandle | None = None
        self._next_discovery: float | None = None

    # --------------------------------------------------------- configuration
    def set_limits(
        self,
        *,
        max_concurrent_ticks: int | None = None,
        tick_timeout_seconds: float | None = None,
        discovery_interval_seconds: float | None = None,
    ) -> None:
        """Apply reloadable limits; in-flight ticks keep the permits they hold."""
        if max_concurrent_ticks is not None and max_concurrent_ticks != self.max_concurrent_ticks:
            self.max_concurrent_ticks = max_concurrent_ticks
            self._limit.resize(max_concurrent_ticks)
        if tick_timeout_seconds is not None:
            self.tick_timeout_seconds = tick_timeout_seconds
        if discovery_interval_seconds is not None:
            self.discovery_interval_seconds = discovery_interval_seconds
            self._next_discovery = self.clock.now()
            self._poke()

    # ------------------------------------------------------------- registry
    @property
    def world_ids(self) -> list[int]:
        return sorted(self._slots)

    async def add_world(self, world_id: int) -> None:
        """Register a world with the scheduler and schedule its first tick one interval from now."""
        ctx = await self.scheduler.register_world(world_id)
        now = self.clock.now()
        interval = ctx.config.tick_interval_seconds
        slot = _Slot(world_id=world_id, interval=interval, anchor=now, k=1, last_tick_at=now)
        old = self._slots.get(world_id)
        if old is not None:
            old.removed = True
        self._slots[world_id] = slot
        self.broken.pop(world_id, None)
        self._push(slot)
        if self.observer:
            self.observer.world_registered(world_id)

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

    async def apply_world_config(self, world_id: int) -> None:
        """Re-read a world's config now; takes effect before its next tick.

        Waits for an in-flight tick of that world first so the elapsed part of
        the interval accrues at the old scale exactly once.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            return
        async with slot.lock:
            now = self.clock.now()
            ctx = await self.scheduler.reload_world(world_id, elapsed_real_since_tick=now - slot.last_tick_at)
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
                self._count_db_error(exc, "tick")
                if self.observer:
                    # No slot was scheduled, so there is no lag to report (NaN).
                    self.observer.tick_finished(world_id, "error", math.nan, self.clock.now() - started, None)
                raise
            self.progress += 1
            if self.observer:
                self.observer.tick_finished(world_id, "ok", math.nan, self.clock.now() - started, result)
            return result

    async def discover(self) -> None:
        """Register newly active worlds, drop inactive ones, pick up config changes."""
        store = self.scheduler.store
        active = await store.discover_active_worlds()
        for world_id in [w for w in self._slots if w not in active]:
            await self.remove_world(world_id)
        for world_id in [w for w in self.broken if w not in active]:
            del self.broken[world_id]
        for world_id, version in sorted(active.items()):
            try:
                if world_id in self._slots:
                    if self.scheduler.get_context(world_id).config_version != version:
                        await self.apply_world_config(world_id)
                elif world_id not in self.broken or self.broken[world_id].config_version != version:
                    await self.add_world(world_id)
            except (ValueError, WorldNotFoundError) as exc:
                # Invalid stored config/behaviour: isolate this world only, with
                # a message naming it and the field; retry when its version changes.
                if world_id in self._slots:
                    await self.remove_world(world_id)
                self.broken[world_id] = BrokenWorld(world_id, version, str(exc))
                log.error("world isolated", world_id=world_id, config_version=version, error=str(exc))

    # ----------------------------------------------------------------- heap
    def _push(self, slot: _Slot) -> None:
        slot.generation += 1
        heapq.heappush(self._heap, (slot.deadline, next(self._seq), slot.world_id, slot.generation))
        if self._heap[0][2] == slot.world_id:
            self._poke()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def next_deadline(self) -> float | None:
        """Earliest pending tick deadline (stale heap entries dropped)."""
        while self._heap:
            _, _, wid, gen = self._heap[0]
            slot = self._slots.get(wid)
            if slot is None or slot.removed or slot.generation != gen or slot.in_flight:
                heapq.heappop(self._heap)
                continue
            return self._heap[0][0]
        return None

    def _pop_due(self, now: float) -> list[_Slot]:
        due: list[_Slot] = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, wid, _ = heapq.heappop(self._heap)
            due.append(self._slots[wid])
        return due

    def _dispatch_due(self, now: float) -> list[asyncio.Task[None]]:
        tasks = []
        for slot in self._pop_due(now):
            scheduled = slot.deadline
            if slot.retry_at is None:
                # Serve the latest slot that has started; the ones before it were missed.
                latest = max(slot.k, math.floor((now - slot.anchor) / slot.interval + 1e-9))
                missed = latest - slot.k
                if missed > 0:
                    self._count_missed(slot, missed)
                    slot.k = latest
                    scheduled = slot.deadline
            slot.in_flight = True
            task = asyncio.create_task(self._tick(slot, scheduled), name=f"tick-world-{slot.world_id}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            tasks.append(task)
        return tasks

    def _count_missed(self, slot: _Slot, missed: int) -> None:
        if slot.world_id in self._slots:
            self.scheduler.get_context(slot.world_id).record_skipped(missed)
        if self.observer:
            self.observer.ticks_missed(slot.world_id, missed)
        log.debug("tick slots missed", world_id=slot.world_id, missed=missed)

    # ----------------------------------------------------------------- tick
    async def _tick(self, slot: _Slot, scheduled: float) -> None:
        outcome = "error"
        result: TickResult | None = None
        lag = 0.0
        began = scheduled
        ran = False
        try:
            async with self._limit, slot.lock:
                if slot.removed or self._stopping:
                    # Removed while queued, or stopping: queued ticks never start.
                    return
                ran = True
                began = self.clock.now()
                lag = max(began - scheduled, 0.0)
                try:
                    async with asyncio.timeout(self.tick_timeout_seconds):
                        result, started = await self._tick_unit(slot)
                except TimeoutError:
                    outcome = "timeout"
                    log.error(
                        "tick timed out",
                        world_id=slot.world_id,
                        tick_timeout_seconds=self.tick_timeout_seconds,
                    )
                except StaleWorldStateError as exc:
                    log.error("tick refused: world state moved underneath", world_id=slot.world_id, error=str(exc))
                    await self._resync(slot)
                except Exception as exc:
                    log.exception("tick failed", world_id=slot.world_id)
                    self._count_db_error(exc, "tick")
                else:
                    outcome = "ok"
                    slot.last_tick_at = started
        finally:
            slot.in_flight = False
            self.progress += 1
            if ran:
                duration = self.clock.now() - began
                if outcome == "ok":
                    self.ticks_ok += 1
                else:
                    self.ticks_failed += 1
                if self.observer:
                    self.observer.tick_finished(slot.world_id, outcome, lag, duration, result)
            if not slot.removed and not self._stopping:
                self._reschedule(slot, ok=outcome == "ok")

    async def _tick_unit(self, slot: _Slot) -> tuple[TickResult, float]:
        """The tick as one unit of work: a transient database error re-runs all of it.

        Each attempt measures its own elapsed time, so a retried tick covers
        the real time up to its own start; returns (result, start of the
        attempt that committed). A commit whose outcome was unknown cannot be
        applied twice: the retry's fence check fails and the world resyncs.
        """
        started = self.clock.now()

        async def attempt() -> TickResult:
            nonlocal started
            started = self.clock.now()
            return await self.scheduler.tick_world(slot.world_id, max(started - slot.last_tick_at, 0.0))

        result = await retry_transient(
            "tick", attempt, max_attempts=_UNIT_ATTEMPTS, multiplier=0.05, max_wait=0.5, world_id=slot.world_id
        )
        return result, started

    async def _resync(self, slot: _Slot) -> None:
        try:
            ctx = await self.scheduler.resync_world(slot.world_id)
        except Exception:
            log.exception("world resync failed", world_id=slot.world_id)
            return
        # A tick we saw fail had committed: the next tick starts where it
        # started, or its interval would be counted twice.
        slot.last_tick_at += ctx.adopted_real_seconds

    def _reschedule(self, slot: _Slot, *, ok: bool) -> None:
        now = self.clock.now()
        if ok:
            slot.failures = 0
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
        tasks = self._dispatch_due(self.clock.now())
        before_failed = self.ticks_failed
        if tasks:
            await asyncio.gather(*tasks)
        return {"ticked": len(tasks), "failed": self.ticks_failed - before_failed}

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
            tasks = self._dispatch_due(self.clock.now())
            if tasks:
                await asyncio.gather(*tasks)

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
        try:
            while not self._stopping:
                now = self.clock.now()
                self.progress += 1
                if (discovery is None or discovery.done()) and now >= (self._next_discovery or now):
                    discovery = asyncio.create_task(self._discover_safely(), name="discovery")
                    self._next_discovery = now + self.discovery_interval_seconds
                self._dispatch_due(now)
                wake_at = min(
                    d
                    for d in (self.next_deadline(), self._next_discovery, now + self.idle_wake_seconds)
                    if d is not None
                )
                self._wake = loop.create_future()
                self._timer = self.clock.call_at(wake_at, self._poke)
                try:
                    await self._wake
                finally:
                    self._timer.cancel()
                    self._wake = None
        finally:
            if discovery is not None and not discovery.done():
                discovery.cancel()
                await asyncio.gather(discovery, return_exceptions=True)
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

    def stop(self) -> None:
        """Stop starting new ticks; :meth:`start` returns once in-flight ticks finish."""
        self._stopping = True
        self._poke()

    async def _drain(self) -> None:
        if self._inflight:
            log.info("waiting for in-flight ticks", count=len(self._inflight))
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def shutdown(self, worlds: Iterable[int] | None = None) -> None:
        """Unregister worlds (all by default) after the loop has stopped."""
        for world_id in list(worlds if worlds is not None else self._slots):
            await self.remove_world(world_id)

    def get_stats(self) -> dict[str, Any]:
        """Runner-level stats plus every world's context stats and isolated worlds."""
        stats = self.scheduler.get_stats()
        stats.update(
            ticks_ok=self.ticks_ok,
            ticks_failed=self.ticks_failed,
            in_flight=len(self._inflight),
            broken_worlds={
                wid: {"config_version": b.config_version, "error": b.error} for wid, b in self.broken.items()
            },
        )
        return stats
