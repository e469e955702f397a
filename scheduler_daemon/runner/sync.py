"""Asyncio primitives the runner is built on, general enough to stand alone.

FIFO gates whose uncontended acquire is a plain call (:class:`FifoGate`,
:class:`ResizableLimit`, :class:`SlotLock`), and one loop timer for the
timeouts of every in-flight batch (:class:`BatchTimeouts`).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class FifoGate:
    """What a FIFO lock and a FIFO semaphore share: waiters queue, the uncontended acquire is a plain call.

    :meth:`try_acquire` takes the gate without a coroutine or a future; only
    when it fails does :meth:`acquire` queue a future, which the subclass's
    :meth:`release` resolves to hand the gate over (``asyncio.Lock``'s and
    ``asyncio.Semaphore``'s coroutines cost per tick; see docs/performance.md).
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


class ResizableLimit(FifoGate):
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


class SlotLock(FifoGate):
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


class BatchTimeouts:
    """The tick timeout of every in-flight batch on one loop timer.

    ``asyncio.timeout`` arms and cancels a loop timer per batch, a noticeable share
    of a batch's cost (docs/performance.md). Batches share one
    timeout length, so their deadlines arrive in start order: one timer armed
    for the earliest is re-armed only when it fires. The semantics are
    ``asyncio.timeout``'s: at its deadline the batch's task is cancelled, and
    the cancellation leaves the scope as :class:`TimeoutError` unless the
    task was also cancelled from outside (stop, shutdown).
    """

    __slots__ = ("_scopes", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._scopes: dict[TimeoutScope, None] = {}  # in flight, in start order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def scope(self, seconds: float) -> TimeoutScope:
        """A ``with`` block that times out after ``seconds`` of loop time."""
        return TimeoutScope(self, seconds)

    def _enter(self, scope: TimeoutScope) -> None:
        self._scopes[scope] = None
        if scope.deadline < self._timer_at:  # only when the timeout was shortened (reload) or none is armed
            self._arm(scope.deadline)

    def _exit(self, scope: TimeoutScope) -> None:
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


class TimeoutScope:
    __slots__ = ("_cancelling", "_owner", "deadline", "expired", "task")

    def __init__(self, owner: BatchTimeouts, seconds: float) -> None:
        self._owner = owner
        task = asyncio.current_task()
        assert task is not None, "a timeout scope needs a running task"
        self.task = task
        self._cancelling = task.cancelling()
        self.deadline = asyncio.get_running_loop().time() + seconds
        self.expired = False

    def __enter__(self) -> TimeoutScope:
        self._owner._enter(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._owner._exit(self)
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
