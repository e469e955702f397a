"""The one clock abstraction used for scheduling.

Production uses :class:`MonotonicClock`; tests and ``simulate`` use
:class:`VirtualClock`, which only moves when told to, so scheduling logic is
tested without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time source in seconds plus ways to wait for a moment."""

    def now(self) -> float:
        """Current monotonic time in seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (or at once if it already is)."""
        ...

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` (in the event loop) once ``now() >= deadline``."""
        ...


class MonotonicClock:
    """Real time from ``time.monotonic()``; immune to wall-clock jumps."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerHandle:
        loop = asyncio.get_running_loop()
        # The loop's own timer heap; translate our clock to the loop's clock.
        return loop.call_at(loop.time() + (deadline - time.monotonic()), callback)


class VirtualClock:
    """A clock that advances only through :meth:`advance` / :meth:`set`.

    Sleepers are woken in deadline order as time passes them. ``advance`` is
    synchronous: woken coroutines run at the caller's next ``await``.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._timers: list[tuple[float, int, _VirtualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _VirtualTimer(callback)
        if deadline <= self._now:
            asyncio.get_running_loop().call_soon(timer.fire)
        else:
            heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def next_wakeup(self) -> float | None:
        """Earliest pending sleeper or timer deadline, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        candidates = [h[0][0] for h in (self._sleepers, self._timers) if h]
        return min(candidates) if candidates else None

    def set(self, t: float) -> None:
        """Move time to ``t`` (never backwards) and wake due sleepers."""
        if t < self._now:
            raise ValueError(f"virtual clock cannot go backwards ({t} < {self._now})")
        self._now = t
        while self._sleepers and self._sleepers[0][0] <= t:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
        while self._timers and self._timers[0][0] <= t:
            _, _, timer = heapq.heappop(self._timers)
            timer.fire()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("cannot advance by a negative duration")
        self.set(self._now + seconds)


class _VirtualTimer:
    __slots__ = ("_callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._callback()
