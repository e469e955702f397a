"""Adoption: running the worlds registered on the scheduler by hand.

The embedding patterns (``scheduler.register_world(w)`` for each world, then
``SchedulerLoopRunner(scheduler).run_once()`` from a cron job, or
``runner.start()``) register worlds on the :class:`WorldScheduler`, not on the
runner. The runner adopts them: each gets a slot, due at once. Discovery keeps
an adopted world even when it does not list it (it is the caller's to
unregister) and re-reads its config when its version moves.

A fresh runner knows nothing of a world's previous ticks, and a cron job makes
a new one every call. So the first tick of an adopted world covers the real
time since its committed world time (the ``last_advanced_at`` stamp of its
last tick), at most ``maxCatchUpSeconds`` as for any late tick: a cron job
advances the world at the real rate whatever its period and the world's
interval, two calls in quick succession cover only the time between them (the
clock never counts a second twice), a clock stamp in the future (another
host's clock ahead of ours) covers nothing, and time while no one ran the
world (a cron stopped, a worker down, a pause) moves it by at most
``maxCatchUpSeconds``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from scheduler_daemon.logs import get_logger
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import Slot

log = get_logger("scheduler_daemon.runner")


def first_tick_covers(
    last_advanced_at: datetime | None, wall_now: datetime, interval: float, max_catch_up: float
) -> float:
    """Real seconds the first tick of an adopted world covers (pure).

    The wall time since ``last_advanced_at`` (the time its committed world
    time corresponds to), between 0 and ``max_catch_up``; one ``interval``
    for a world never ticked. A naive stamp is UTC (SQLite returns them so).
    """
    if last_advanced_at is None:
        return interval
    if last_advanced_at.tzinfo is None:
        last_advanced_at = last_advanced_at.replace(tzinfo=UTC)
    return min(max((wall_now - last_advanced_at).total_seconds(), 0.0), max_catch_up)


class Adoption(RunnerBase):
    """Takes up worlds registered on the scheduler by hand."""

    def adopt_registered(self) -> list[int]:
        """Run the worlds registered on the scheduler that this runner does not run yet; returns them.

        :meth:`run_once`, :meth:`start` and every discovery pass call it, so
        ``scheduler.register_world(w)`` before or while the runner runs is
        enough. Each adopted world is due at once; its first tick covers the
        real time since its last committed tick, at most ``maxCatchUpSeconds``
        (see the module's doc). A world registered again by hand (a new
        context) keeps its slot and runs on the new context.

        With leases (several daemons) nothing is adopted: only worlds whose
        lease this runner holds may tick, and discovery registers those itself.
        """
        if self.leases is not None or self.scheduler.registrations == self._registrations_seen:
            return []  # (nothing registered or unregistered since the last look: no scan over every world)
        self._registrations_seen = self.scheduler.registrations
        contexts = self.scheduler.get_all_contexts()
        adopted: list[int] = []
        now, wall = self.clock.now(), datetime.now(UTC)
        for world_id, ctx in contexts.items():
            slot = self._slots.get(world_id)
            if slot is not None:
                if slot.ctx is not ctx and not slot.removed:
                    slot.ctx = ctx
                continue
            interval = ctx.config.tick_interval_seconds
            covers = first_tick_covers(ctx.last_advanced_at, wall, interval, ctx.config.max_catch_up_seconds)
            slot = Slot(
                world_id,
                ctx,
                interval=interval,
                anchor=now - interval,  # slot k = 1 is due now
                k=1,
                last_tick_at=now - covers,
                tiers_at=now,  # registration assigned them
                manual=True,
            )
            self._slots[world_id] = slot
            self.broken.pop(world_id, None)
            # Due at ``now`` exactly: ``anchor + interval`` can round an ulp above it, and run_once would skip it.
            self._push(slot, now)
            if self.observer:
                self.observer.world_registered(world_id)
            adopted.append(world_id)
        if adopted:
            log.info("worlds_adopted", world_ids=sorted(adopted))
        return adopted

    async def _with_adopted(self, active: dict[int, int]) -> dict[int, int]:
        """``active`` plus the config versions of adopted worlds discovery does not list.

        An adopted world whose row is gone from the database is dropped.
        """
        unlisted = [w for w, slot in self._slots.items() if slot.manual and not slot.removed and w not in active]
        if not unlisted:
            return active
        statuses = await self.worlds.world_statuses(unlisted)
        for world_id in unlisted:
            if world_id not in statuses:
                log.warning("adopted_world_gone", world_id=world_id)
                await self.remove_world(world_id)
        return {**active, **{w: status.config_version for w, status in statuses.items()}}
