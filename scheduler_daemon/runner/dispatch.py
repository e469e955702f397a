"""Dispatch: the deadline wheel, the tick timer, and handing due worlds to batch workers.

Each world runs on a fixed-rate grid ``anchor + k × tickIntervalSeconds``; a
world due late is served at its latest started slot and the slots before it
are counted as missed, never replayed in a burst."""

from __future__ import annotations

import asyncio
import math

from scheduler_daemon.deadlines import Entry
from scheduler_daemon.logs import get_logger
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import Slot

log = get_logger("scheduler_daemon.runner")

#: Smallest batch a dispatch is split into to spread it over the workers: below it a
#: batch's fixed statements weigh more than the overlap of batches gains.
MIN_SPLIT_BATCH = 16


class Dispatch(RunnerBase):
    """Turns deadlines into batches of due worlds."""

    def _push(self, slot: Slot, deadline: float | None = None) -> None:
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

        A plain timer callback rather than the loop task waking up: a task
        wakeup per window costs more than the dispatch itself (docs/performance.md).
        """
        self._tick_timer, self._tick_timer_at = None, math.inf
        if self._stopping:
            return
        now = self.clock.now()
        self.progress += 1
        self._dispatch_due(now, now + self.limits.batch_window_seconds)
        following = self.next_deadline()
        if following is not None:
            # At most one dispatch per window: what falls due within it was just dispatched.
            self._arm_ticks(max(following, now + self.limits.batch_window_seconds))

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
        # One task per batch of worlds, not per tick: a task, a timer and a context
        # switch per tick would cost more than the tick bookkeeping. Workers drain the ready queue; worlds that
        # become due while every worker is busy wait and join the next batch
        # (group commit: the busier the database, the bigger the batches).
        tasks: list[asyncio.Task[None]] = []
        # A world that ticks alone is a batch of its own: one worker each, so the
        # neighbours of a hung world, retried alone after their shared batch
        # timed out, do not wait for its retry to time out again.
        alone = self._ready_alone
        wanted = alone + -(-(len(self._ready) - alone) // self._batch_size())
        while self._ready and self._workers < self.limits.max_concurrent_ticks and len(tasks) < wanted:
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
        statements run in the database (one big batch makes the daemon and the
        database take turns). Never below ``MIN_SPLIT_BATCH`` worlds, nor above
        ``max_batch_size``.
        """
        spread = -(-len(self._ready) // max(self._limit.free, 1))
        return min(self.limits.max_batch_size, max(MIN_SPLIT_BATCH, spread))

    def _take_batch(self) -> list[tuple[Slot, float]]:
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

    def _count_missed(self, slot: Slot, missed: int) -> None:
        if not slot.removed:
            slot.ctx.record_skipped(missed)
        if self.observer:
            self.observer.ticks_missed(slot.world_id, missed)
        log.debug("tick_slots_missed", world_id=slot.world_id, missed=missed)
