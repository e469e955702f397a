"""The runner's data: its limits, a registered world's slot, isolated worlds, commit health, chunked scans."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.runner.sync import SlotLock
from scheduler_daemon.scheduler import TickResult
from scheduler_daemon.settings import SchedulerSettings
from scheduler_daemon.store.errors import error_class

#: Scans of every registered world yield to due ticks after this many worlds.
SCAN_CHUNK = 500
#: An interval has at least this many phase slots (see :class:`PhaseSlots`).
PHASE_SLOTS_PER_INTERVAL = 8
#: Layers of phase slots, each between the slots of the ones before (see :class:`PhaseSlots`).
PHASE_LAYERS = 16
_T = TypeVar("_T")


async def in_chunks(items: list[_T]) -> AsyncIterator[list[_T]]:
    """``items`` in chunks of ``SCAN_CHUNK``, letting due ticks run between chunks.

    A scan of thousands of worlds in one loop step delays every tick due
    meanwhile (docs/performance.md).
    """
    for start in range(0, len(items), SCAN_CHUNK):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + SCAN_CHUNK]


def touched_database(result: TickResult) -> bool:
    # A paused world whose clock did not move ticks without a transaction.
    return not result.paused or result.delta_game_seconds != 0.0


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """The runner's tunables (``[scheduler]`` settings); reloadable through :meth:`SchedulerLoopRunner.set_limits`."""

    max_concurrent_ticks: int = 16
    max_batch_size: int = 64
    batch_window_seconds: float = 0.0015
    phase_slot_seconds: float = 0.05
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
            phase_slot_seconds=scheduler.phase_slot_seconds,
            tick_timeout_seconds=scheduler.tick_timeout_seconds,
            discovery_interval_seconds=scheduler.discovery_interval_seconds,
            backoff_max_seconds=scheduler.backoff_max_seconds,
            tier_refresh_max_seconds=scheduler.tier_refresh_max_seconds,
        )


@dataclass(slots=True)
class Slot:
    """Scheduling state of one registered world."""

    world_id: int
    ctx: WorldSimulationContext  # the scheduler's context of this registration (updated in place)
    interval: float
    anchor: float  # start of the fixed-rate grid
    k: int  # index of the next slot on the grid
    last_tick_at: float  # monotonic time the committed world time corresponds to
    lock: SlotLock = field(default_factory=SlotLock)
    generation: int = 0  # bumps invalidate stale deadline entries
    failures: int = 0
    retry_at: float | None = None  # backoff deadline after a failure
    in_flight: bool = False
    removed: bool = False
    tiers_at: float = 0.0  # clock time of the last tier assignment
    solo: bool = False  # its last batch failed as a whole: tick alone until a tick succeeds
    manual: bool = False  # registered on the scheduler by hand: discovery keeps it even if it does not list it
    phase: tuple[float, int, int] | None = None  # (interval, layer, slot) its grid starts in (see PhaseSlots)

    @property
    def deadline(self) -> float:
        return self.retry_at if self.retry_at is not None else self.anchor + self.k * self.interval


class PhaseSlots:
    """Which phase slot each world's grid starts in, so worlds of equal interval tick in batches.

    An interval is cut into slots of at most ``phase_slot_seconds`` (at least
    eight slots); a world's grid anchor moves up to the start of the first slot
    from its own anchor on that has room. Worlds in one slot share every
    deadline and tick as one batch: at 1 Hz, spread over the second, they would
    otherwise tick one or two at a time, each paying its round trips and commit
    alone (docs/performance.md). A slot takes at most ``capacity`` worlds, one
    batch's worth: more would go out as several batches at once, each world
    later than the one before. When every slot of an interval is full, a
    further layer of slots starts halfway between them, then a quarter of the
    way (and so on, :data:`PHASE_LAYERS` layers): many worlds tick in many
    small full batches. A world finding every layer full keeps its own phase.
    """

    def __init__(self) -> None:
        self._load: dict[tuple[float, int, int], int] = {}
        self._full: dict[tuple[float, int], int] = {}  # full slots per (interval, layer): skipped at once
        self._capacity = 0

    @staticmethod
    def width(interval: float, slot_seconds: float) -> tuple[float, int] | None:
        """The slot width for worlds of ``interval`` and how many slots it has (``None``: no phase slots)."""
        if slot_seconds <= 0.0 or interval <= 0.0:
            return None
        count = max(math.ceil(interval / slot_seconds - 1e-9), PHASE_SLOTS_PER_INTERVAL)
        return interval / count, count

    def place(
        self, anchor: float, interval: float, slot_seconds: float, capacity: int
    ) -> tuple[float, tuple[float, int, int] | None]:
        """The anchor to use and the slot taken (``None``: none, the anchor is unchanged); release it later."""
        cut = self.width(interval, slot_seconds)
        if cut is None:
            return anchor, None
        width, count = cut
        if capacity != self._capacity:  # a reload changed max_batch_size: recount the full slots
            self._capacity = capacity
            self._full = {}
            for (each, layer, _), load in self._load.items():
                if load >= capacity:
                    self._full[(each, layer)] = self._full.get((each, layer), 0) + 1
        for layer in range(PHASE_LAYERS):
            if self._full.get((interval, layer), 0) >= count:
                continue
            offset = _layer_offset(layer)
            # A hair below: an anchor already on the grid must not move a whole slot by rounding.
            first = math.ceil(anchor / width - offset - 1e-9)
            for index in range(first, first + count):
                key = (interval, layer, index % count)
                load = self._load.get(key, 0) + 1
                if load <= capacity:
                    self._load[key] = load
                    if load == capacity:
                        self._full[(interval, layer)] = self._full.get((interval, layer), 0) + 1
                    return (index + offset) * width, key
        return anchor, None

    def release(self, key: tuple[float, int, int] | None) -> None:
        """A world left the slot ``key`` (from :meth:`place`)."""
        if key is None:
            return
        load = self._load.get(key, 0)
        if load == self._capacity:
            layer = key[:2]
            self._full[layer] = self._full.get(layer, 1) - 1
        if load > 1:
            self._load[key] = load - 1
        else:
            self._load.pop(key, None)


def _layer_offset(layer: int) -> float:
    """Where a layer's slots start, as a fraction of a slot: 0, 1/2, 1/4, 3/4, 1/8, … (bits reversed)."""
    offset, weight = 0.0, 0.5
    while layer:
        if layer & 1:
            offset += weight
        layer >>= 1
        weight /= 2
    return offset


@dataclass(slots=True)
class BrokenWorld:
    """A world that could not be registered (an unusable stored row, invalid config or behaviour)."""

    world_id: int
    config_version: int
    error: str
    retry_at: float = math.inf  # clock time of the next registration attempt without a version change


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
