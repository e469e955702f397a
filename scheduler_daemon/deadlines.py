"""``DeadlineWheel``: the runner's queue of tick deadlines, bucketed by time.

A binary heap of 10,000 ``(deadline, world_id, generation)`` tuples costs a
pop and a push per tick, each walking ~14 levels of tuples and floats spread
over memory: in the core benchmark that pop alone was a quarter of the
runner's CPU (cache misses, not comparisons). Deadlines that fall in the same
``resolution`` (1 ms) bucket are due together anyway (the runner coalesces
over its batch window), so they share a list: a push appends, and only the
bucket keys (small ints, one per occupied millisecond) live in a heap.

Entries are popped in ``(deadline, world_id)`` order, exactly as from a heap
of the tuples, and never before their deadline: the bucket that contains the
horizon is split, not emptied.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

#: ``(deadline, world_id, generation)``; a bumped generation makes an entry stale.
Entry = tuple[float, int, int]


class DeadlineWheel:
    """Deadlines in buckets of ``resolution`` seconds, earliest bucket first."""

    __slots__ = ("_buckets", "_inv", "_keys", "_size")

    def __init__(self, resolution: float = 0.001) -> None:
        if not resolution > 0:
            raise ValueError(f"resolution must be > 0, got {resolution!r}")
        self._inv = 1.0 / resolution
        self._buckets: dict[int, list[Entry]] = {}
        self._keys: list[int] = []  # heap of the occupied buckets' keys
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, deadline: float, world_id: int, generation: int) -> None:
        """Queue one entry (stale ones are left for the reader to skip)."""
        key = math.floor(deadline * self._inv)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [(deadline, world_id, generation)]
            heapq.heappush(self._keys, key)
        else:
            bucket.append((deadline, world_id, generation))
        self._size += 1

    def pop_due(self, horizon: float) -> list[Entry]:
        """Remove and return every entry with ``deadline <= horizon``, in ``(deadline, world_id)`` order."""
        keys, buckets = self._keys, self._buckets
        last = math.floor(horizon * self._inv)
        due: list[Entry] = []
        while keys and keys[0] <= last:
            key = keys[0]
            bucket = buckets[key]
            bucket.sort()
            if key < last:
                # deadline × inv < key + 1 <= horizon × inv: all of it is due.
                heapq.heappop(keys)
                del buckets[key]
                due += bucket
                continue
            cut = 0
            while cut < len(bucket) and bucket[cut][0] <= horizon:
                cut += 1
            due += bucket[:cut]
            if cut == len(bucket):
                heapq.heappop(keys)
                del buckets[key]
            else:
                del bucket[:cut]
            break
        self._size -= len(due)
        return due

    def earliest(self, current: Callable[[Entry], bool]) -> float | None:
        """Earliest deadline among entries ``current`` accepts; the others are dropped on the way."""
        keys, buckets = self._keys, self._buckets
        while keys:
            key = keys[0]
            bucket = buckets[key]
            live = [entry for entry in bucket if current(entry)]
            self._size -= len(bucket) - len(live)
            if live:
                buckets[key] = live
                return min(live)[0]
            heapq.heappop(keys)
            del buckets[key]
        return None
