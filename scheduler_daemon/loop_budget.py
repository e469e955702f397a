"""``LoopBudget``: caps the event loop's share that admin work (lists, ``/metrics``) may take from ticks.

The daemon serves its admin API in the loop that ticks the worlds, so every
millisecond a handler computes is a millisecond no tick starts. Handlers that
scale with the number of worlds split their work into pieces, wait for their
turn before each (:meth:`LoopBudget.turn`) and report how long the piece kept
the loop busy (:meth:`LoopBudget.spent`). After a piece that took ``b``
seconds, the next piece of *any* admin request starts no earlier than
``b × (1 / share − 1)`` later, so however many clients ask at once, admin
work takes at most ``share`` of the loop and due ticks run in between.
Callers only wait longer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


class LoopBudget:
    """A duty cycle for admin work on the event loop (see the module docstring)."""

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.share = share
        self._free_at = 0.0  # loop time before which no admin piece may start
        #: Seconds of loop time admin work has used, and waited for its turn (for tests and metrics).
        self.busy_seconds = 0.0
        self.waited_seconds = 0.0

    async def turn(self) -> None:
        """Wait until admin work may use the loop again (at once when the budget has room)."""
        loop = asyncio.get_running_loop()
        while (delay := self._free_at - loop.time()) > 0:
            self.waited_seconds += delay
            await asyncio.sleep(delay)

    def spent(self, busy_seconds: float) -> None:
        """Record that a piece of admin work kept the loop busy for ``busy_seconds``."""
        now = asyncio.get_running_loop().time()
        self.busy_seconds += busy_seconds
        self._free_at = max(self._free_at, now) + busy_seconds * (1.0 / self.share - 1.0)

    async def map(self, items: Sequence[_T], work: Callable[[_T], _R], *, chunk: int = 100) -> list[_R]:
        """``[work(item) for item in items]`` in pieces of ``chunk``, each taking its turn and charged."""
        out: list[_R] = []
        for piece in _pieces(items, chunk):
            await self.turn()
            started = time.perf_counter()
            out += map(work, piece)
            self.spent(time.perf_counter() - started)
        return out

    async def call(self, work: Callable[[], _R]) -> _R:
        """``work()`` (one piece that cannot be split), after its turn, charged."""
        await self.turn()
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.spent(time.perf_counter() - started)


def _pieces(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
