"""Applying changes of worlds, sessions and NPCs at once (ingest API, PostgreSQL notifications).

Discovery notices every change within ``discovery_interval_seconds`` (NPC rows
within ``tier_refresh_max_seconds``); :meth:`ChangeApplication.apply_changes`
applies the changes of named worlds now, so their next tick sees them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

from scheduler_daemon.logs import get_logger
from scheduler_daemon.retry import first_line
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import Slot
from scheduler_daemon.store.errors import LeaseLostError
from scheduler_daemon.store.worlds import WorldStatus

log = get_logger("scheduler_daemon.runner")


class ChangeApplication(RunnerBase):
    """Applies what changed in given worlds before their next tick."""

    async def apply_changes(self, world_ids: Collection[int]) -> None:
        """Apply what changed in these worlds' rows, sessions or NPCs; their next tick sees it.

        For each world registered on this runner, under the world's lock
        (never concurrently with its tick): a new stored config version is
        applied as discovery applies it (an invalid one isolates the world:
        it is unregistered and listed in :attr:`broken` with the reason), then
        its tiers are recomputed from its current sessions and NPCs, always
        (NPC rows added, removed or re-homed leave the sessions' fingerprint
        unchanged). A registered world that no longer exists is unregistered
        (with leases, its lease released).

        Which worlds run stays discovery's decision: a registered world that
        should no longer run (its last session closed), or a world not
        registered here that should run (and is not isolated at its current
        config version), makes the loop run a discovery pass at once (see
        :meth:`discover_soon`). Without a running loop (``run_once`` or
        ``run_until`` use) nothing is registered or unregistered that way:
        the caller registers the worlds it ticks, or calls :meth:`discover`.
        With leases, a world another live daemon owns is left to its owner.
        Unknown world ids are ignored.

        Never raises for a world's problem or a database error: what could
        not be applied is logged and left to a discovery pass, requested at
        once. Returns when every registered world's change is applied.
        """
        ids = sorted(set(world_ids))
        if not ids:
            return
        try:
            statuses = await self.worlds.world_statuses(ids)
        except Exception as exc:
            self._changes_failed(ids, exc)
            return
        discover = False
        for world_id in ids:
            slot = self._slots.get(world_id)
            if slot is not None:
                discover |= await self._apply_world_changes(slot, statuses.get(world_id))
        candidates = [w for w, status in statuses.items() if w not in self._slots and self._may_register(w, status)]
        if candidates and self.leases is not None:
            try:
                candidates = sorted(set(candidates) - await self.leases.held_elsewhere(candidates))
            except Exception as exc:
                self._changes_failed(candidates, exc)
                return
        if discover or candidates:
            self.discover_soon()

    @asynccontextmanager
    async def deleting(self, world_id: int) -> AsyncIterator[None]:
        """Hold a world's ticks while the block deletes it; once it has, none of them runs again.

        An in-flight tick finishes first, and none starts during the block: a
        tick's writes and the delete's cascade, at once, deadlock on
        PostgreSQL or fail the tick's fence. If the block raises, the world
        ticks on. Call :meth:`apply_changes` after it to drop the world. A
        world not registered here: the block just runs.
        """
        slot = self._slots.get(world_id)
        if slot is None:
            yield
            return
        async with slot.lock:
            yield
            self._retire(slot)  # a tick queued meanwhile must not start on the deleted world

    def _may_register(self, world_id: int, status: WorldStatus) -> bool:
        """Whether discovery would try to register this unregistered world now."""
        broken = self.broken.get(world_id)
        return status.should_run and (
            broken is None or broken.config_version != status.config_version or self.clock.now() >= broken.retry_at
        )

    async def _apply_world_changes(self, slot: Slot, status: WorldStatus | None) -> bool:
        """Apply one registered world's changes; returns whether a discovery pass should follow."""
        world_id = slot.world_id
        if status is None:
            log.info("world_deleted", world_id=world_id)
            try:
                if self.leases is not None:
                    await self._give_up([world_id], reason="deleted")
                else:
                    await self.remove_world(world_id)
            except Exception as exc:  # releasing the lease; the world is dropped either way
                self._changes_failed([world_id], exc)
            self.changes_applied += 1
            return False
        async with slot.lock:  # never concurrently with this world's tick
            if slot.removed:
                return False
            try:
                if slot.ctx.config_version != status.config_version:
                    await self._reconfigure(slot)
            except (ValueError, LookupError) as exc:
                # Invalid stored config/behaviour: isolate this world only, as discovery does.
                await self._unregister_held(slot)
                self._isolate(world_id, status.config_version, exc)
                self.changes_applied += 1
                return False
            except Exception as exc:
                self._changes_failed([world_id], exc)
                return True
            try:
                await self.scheduler.refresh_tiers(world_id)
            except LeaseLostError:
                # Another instance owns the world now (it applies the change); our next tick's fence drops it.
                log.info("changes_skipped_lease_lost", world_id=world_id)
                return False
            except Exception as exc:
                # Keeps the old tiers; the next discovery pass recomputes them.
                slot.tiers_at = -math.inf
                log.error("tier_assignment_failed", world_id=world_id, error=f"{type(exc).__name__}: {exc}")
                self._count_db_error(exc, "changes")
                return True
            slot.tiers_at = self.clock.now()
        self.changes_applied += 1
        return not status.should_run

    def _changes_failed(self, world_ids: list[int], exc: Exception) -> None:
        log.error("changes_not_applied", world_ids=world_ids, error=first_line(exc))
        self._count_db_error(exc, "changes")
        self.discover_soon()
