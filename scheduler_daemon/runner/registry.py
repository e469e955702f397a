"""Registering, reconfiguring, force-ticking and removing worlds on the runner."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from scheduler_daemon.logs import get_logger
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import Slot, touched_database
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError
from scheduler_daemon.store.errors import LeaseLostError
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.worlds import WorldRecord

log = get_logger("scheduler_daemon.runner")


class WorldRegistry(RunnerBase):
    """The registered worlds: add, remove, apply a new config, force a tick."""

    @property
    def world_ids(self) -> list[int]:
        """The worlds this runner runs, by id."""
        return sorted(w for w, slot in self._slots.items() if not slot.removed)

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
                log.info("world_registration_skipped_lease_lost", world_id=world_id)
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
            slot = Slot(world_id, answer, interval=interval, anchor=anchor, k=1, last_tick_at=now, tiers_at=now)
            self._place(slot, anchor)
            old = self._slots.get(world_id)
            if old is not None:
                self._retire(old)
            self._slots[world_id] = slot
            self.broken.pop(world_id, None)
            self._push(slot)
            if self.observer:
                self.observer.world_registered(world_id)
        return failed

    def _place(self, slot: Slot, anchor: float) -> None:
        """Start the slot's grid at ``anchor``, moved up into a phase slot with room (see ``PhaseSlots``)."""
        self._phases.release(slot.phase)
        slot.anchor, slot.phase = self._phases.place(
            anchor, slot.interval, self.limits.phase_slot_seconds, self.limits.max_batch_size
        )

    def _retire(self, slot: Slot) -> None:
        """The slot will not run again: out of its phase slot."""
        if not slot.removed:
            slot.removed = True
            self._phases.release(slot.phase)
            slot.phase = None

    async def remove_world(self, world_id: int) -> None:
        """Stop ticking a world (waits for its in-flight tick) and unregister it.

        The slot stays (marked removed) until the world is unregistered, so
        nothing takes the world up again in between (adoption, see
        :meth:`adopt_registered`), and a slot that replaced it meanwhile
        (:meth:`add_worlds`) keeps its registration.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            return
        self._retire(slot)
        async with slot.lock:
            if self._slots.get(world_id) is not slot:
                return  # replaced or removed while we waited
            del self._slots[world_id]
            await self.scheduler.unregister_world(world_id)
        if self.observer:
            self.observer.world_unregistered(world_id)

    def _forget_unregistered(self, slot: Slot) -> None:
        """The world was unregistered on the scheduler by hand (its tick found it gone): stop running it."""
        self._retire(slot)
        if self._slots.get(slot.world_id) is slot:
            del self._slots[slot.world_id]
            log.info("world_unregistered_externally", world_id=slot.world_id)
            if self.observer:
                self.observer.world_unregistered(slot.world_id)

    async def apply_world_config(self, world_id: int, record: WorldRecord | None = None) -> None:
        """Re-read a world's config now (or apply ``record``, just written); takes effect before its next tick.

        Waits for an in-flight tick of that world first so the elapsed part of
        the interval accrues at the old scale exactly once.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            return
        async with slot.lock:
            if slot.removed:
                return
            await self._reconfigure(slot, record)

    async def _reconfigure(self, slot: Slot, record: WorldRecord | None = None) -> None:
        """The body of :meth:`apply_world_config`; the caller holds the slot's lock."""
        now = self.clock.now()
        ctx = await self.scheduler.reload_world(
            slot.world_id, elapsed_real_since_tick=now - slot.last_tick_at, record=record
        )
        new_interval = ctx.config.tick_interval_seconds
        if new_interval != slot.interval:
            # Re-anchor the grid at the last tick so the new rate starts from it.
            slot.interval = new_interval
            self._place(slot, slot.last_tick_at)
            slot.k = 1
            if not slot.in_flight:
                self._push(slot)

    async def _unregister_held(self, slot: Slot) -> None:
        """Unregister a world whose slot lock the caller holds (from inside its tick, or a change)."""
        self._retire(slot)
        if self._slots.get(slot.world_id) is slot:
            del self._slots[slot.world_id]
            await self.scheduler.unregister_world(slot.world_id)
            if self.observer:
                self.observer.world_unregistered(slot.world_id)

    async def force_tick(self, world_id: int, delta_real_seconds: float) -> TickResult:
        """Tick one registered world now, covering ``delta_real_seconds`` of real time.

        For the admin API: an extra tick on top of the world's grid (its next
        regular tick still covers the real time since the previous regular
        one). Holds the world's lock, so it never overlaps a loop tick.
        Raises :class:`~scheduler_daemon.scheduler.WorldNotRegisteredError`
        (also when its lease turns out lost: the world is dropped).
        """
        async with self._holding(world_id) as slot:
            return await self._extra_tick(slot, delta_real_seconds)

    async def freeze_paused(self, world_id: int) -> float:
        """Commit a paused world's clock as of now, so that it stays where it is; returns its world time.

        A pause accepted between two ticks lets the part of the interval
        before it accrue at the old rate (:meth:`apply_world_config`), which
        the world's next tick would commit after the pause was answered. Here,
        under the world's lock (after a tick in flight), a tick covering the
        real time since the last one commits that part at once; every later
        tick of the paused world writes nothing. A world that is not paused
        (resumed meanwhile), or has nothing to commit, is left as it is.
        Raises :class:`~scheduler_daemon.scheduler.WorldNotRegisteredError`
        (also when its lease turns out lost: the world is dropped), or the
        tick's error (the world's next tick then commits that part).
        """
        async with self._holding(world_id) as slot:
            ctx = slot.ctx
            now = self.clock.now()
            wall = datetime.now(UTC)
            elapsed = max(now - slot.last_tick_at, 0.0)
            if ctx.paused and ctx.plan_advance(elapsed).delta_game_seconds != 0.0:
                await self._extra_tick(slot, elapsed, wall_at=wall)
                # A regular tick now: the next one covers the (paused) time from here.
                slot.last_tick_at = now
            return ctx.current_world_time

    @asynccontextmanager
    async def _holding(self, world_id: int) -> AsyncIterator[Slot]:
        """The world's slot with its lock held; :class:`WorldNotRegisteredError` if it is not (or no longer) here."""
        slot = self._slots.get(world_id)
        if slot is None:
            raise WorldNotRegisteredError(world_id)
        async with slot.lock:
            if slot.removed:
                raise WorldNotRegisteredError(world_id)
            yield slot

    async def _extra_tick(
        self, slot: Slot, delta_real_seconds: float, *, wall_at: datetime | None = None
    ) -> TickResult:
        """A tick outside the grid (the slot's lock held): counted and observed as a forced one.

        A lost lease drops the world, as its regular tick would, and raises
        :class:`WorldNotRegisteredError` (nothing was written; another instance runs it).
        """
        started = self.clock.now()
        try:
            result = await self.scheduler.tick_world(slot.world_id, delta_real_seconds, wall_at=wall_at)
        except LeaseLostError:
            await self._drop_lost_in_tick(slot, reason="fence")
            raise WorldNotRegisteredError(slot.world_id) from None
        except Exception as exc:
            self._tick_failed(exc)
            if self.observer:
                # No slot was scheduled, so there is no lag to report (NaN).
                self.observer.tick_finished(slot.world_id, "error", math.nan, self.clock.now() - started, None)
            raise
        self.progress += 1
        if touched_database(result):
            self.commits.committed(self.clock.now())
        if self.observer:
            self.observer.tick_finished(slot.world_id, "ok", math.nan, self.clock.now() - started, result)
        return result
