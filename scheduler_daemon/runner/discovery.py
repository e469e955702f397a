"""Discovery: which worlds should run (and at which config version), tier refreshes, isolated worlds.

Scans over every registered world go in chunks with due ticks running between
them; a world that cannot be registered is isolated with its reason, logged
once, and tried again when its config version moves or after ``BROKEN_RETRY_SECONDS``."""

from __future__ import annotations

import asyncio

from scheduler_daemon.logs import get_logger
from scheduler_daemon.retry import first_line, retry_transient
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import SCAN_CHUNK, BrokenWorld, in_chunks
from scheduler_daemon.simulation.tiers import NO_SESSIONS_FINGERPRINT

log = get_logger("scheduler_daemon.runner")

#: Worlds registered per transaction (one statement of each kind for all of them).
REGISTER_CHUNK = 250
#: An isolated world is tried again this often even if its config version did not move
#: (a fix of its state row or of a value the version does not cover).
BROKEN_RETRY_SECONDS = 30.0
#: A transient database error re-runs a discovery pass (and a tick) this many times in all.
UNIT_ATTEMPTS = 3


class Discovery(RunnerBase):
    """Keeps the registered worlds in step with the database."""

    async def discover(self) -> None:
        """Register newly active worlds, drop inactive ones, pick up config changes.

        New worlds are registered in chunks of ``REGISTER_CHUNK`` (one
        transaction each); :attr:`registration` tells how far the pass got.
        A world that cannot be registered is isolated (:attr:`broken`) with
        the reason, logged once, and tried again when its config version moves
        or after ``BROKEN_RETRY_SECONDS``. Without leases, worlds registered
        on the scheduler by hand are adopted first and kept even if the
        database does not list them (see :meth:`adopt_registered`).
        """
        active = await self.worlds.discover_active_worlds()
        if self.leases is not None:
            active = await self._balance(active)
        else:
            self.adopt_registered()
            active = await self._with_adopted(active)
        for world_id in sorted(self._slots.keys() - active.keys()):
            await self.remove_world(world_id)
        for world_id in self.broken.keys() - active.keys():
            del self.broken[world_id]
        # Only worlds that are new, or whose version moved, are looked at one
        # by one; the registered worlds are compared in chunks with due ticks
        # running between them.
        broken, now = self.broken, self.clock.now()
        new = sorted(
            w
            for w in active.keys() - self._slots.keys()
            if w not in broken or broken[w].config_version != active[w] or now >= broken[w].retry_at
        )
        changed: list[int] = []
        async for chunk in in_chunks(list(self._slots.items())):
            changed += (w for w, s in chunk if s.ctx.config_version != active.get(w, s.ctx.config_version))
        self.registration = (0, len(new))
        for start in range(0, len(new), REGISTER_CHUNK):
            batch = new[start : start + REGISTER_CHUNK]
            for world_id, exc in (await self.add_worlds(batch)).items():
                self._isolate(world_id, active[world_id], exc)
            self.registration = (min(start + REGISTER_CHUNK, len(new)), len(new))
            await asyncio.sleep(0)
        for n, world_id in enumerate(sorted(changed), 1):
            if n % SCAN_CHUNK == 0:
                await asyncio.sleep(0)
            slot = self._slots.get(world_id)
            if slot is None or slot.ctx.config_version == active[world_id]:
                continue
            try:
                await self.apply_world_config(world_id)
            except (ValueError, LookupError) as exc:
                # Invalid stored config/behaviour: isolate this world only.
                await self.remove_world(world_id)
                self._isolate(world_id, active[world_id], exc)
        await self.refresh_tiers()

    def discover_soon(self) -> bool:
        """Run a discovery pass now rather than at the next interval; False if no loop runs to do it.

        While :meth:`start` runs, a pass already under way is followed by
        another one as soon as it ends (it may have read the database before
        the change that asked for this one).
        """
        if not self._pumping:  # set while start() runs
            return False
        self._next_discovery = self.clock.now()
        self._poke()
        return True

    def _isolate(self, world_id: int, version: int, exc: Exception) -> None:
        """Keep a world that cannot run out of ticking, with its reason; logged once per reason."""
        error = str(exc)
        before = self.broken.get(world_id)
        self.broken[world_id] = BrokenWorld(world_id, version, error, self.clock.now() + BROKEN_RETRY_SECONDS)
        if before is None or before.error != error:
            log.error("world_isolated", world_id=world_id, config_version=version, error=error)

    async def refresh_tiers(self) -> list[int]:
        """Recompute tiers of the registered worlds whose tier inputs changed.

        One query reads every world's active sessions; a world is recomputed
        only if its sessions' fingerprint changed or a decision moved an NPC
        to or from a place tiering looks at (see
        :meth:`~scheduler_daemon.scheduler.WorldScheduler.tiers_outdated`), so
        an unchanged world costs nothing. Runs with discovery, i.e. at most
        every ``discovery_interval_seconds``. Independently, every world is
        recomputed at least every ``tier_refresh_max_seconds``: that picks up
        what no fingerprint sees (NPCs added, removed or re-homed by the game
        backend). Returns the worlds recomputed.
        """
        read = await self.worlds.active_session_views()
        self.scheduler.note_ignored_sessions(read.ignored)
        sessions = read.views
        refreshed: list[int] = []
        now, max_age = self.clock.now(), self.limits.tier_refresh_max_seconds
        # A cheap superset of the worlds to recompute first (nobody online, no
        # NPC moved, not due periodically: nothing to do), as in discover().
        candidates: list[int] = []
        async for chunk in in_chunks(list(self._slots.items())):
            candidates += (
                w
                for w, s in chunk
                if w in sessions
                or now - s.tiers_at >= max_age
                or s.ctx.tiers_stale
                or s.ctx.sessions_fingerprint != NO_SESSIONS_FINGERPRINT
            )
        candidates.sort()
        for n, world_id in enumerate(candidates, 1):
            if n % SCAN_CHUNK == 0:
                await asyncio.sleep(0)  # as in discover(): due ticks run between chunks
            slot = self._slots.get(world_id)
            if slot is None:
                continue  # removed meanwhile
            views = sessions.get(world_id, [])
            periodic = self.clock.now() - slot.tiers_at >= max_age
            if slot.removed or not (periodic or self.scheduler.tiers_outdated(world_id, views)):
                continue
            try:
                async with slot.lock:  # never concurrently with this world's tick
                    if slot.removed:
                        continue
                    await self.scheduler.refresh_tiers(world_id, views)
                    slot.tiers_at = self.clock.now()
                refreshed.append(world_id)
            except Exception as exc:
                # Keeps the old tiers; retried at the next discovery.
                log.error("tier_assignment_failed", world_id=world_id, error=f"{type(exc).__name__}: {exc}")
        return refreshed

    async def _discover_safely(self) -> None:
        try:
            await retry_transient("world_discovery", self.discover, max_attempts=UNIT_ATTEMPTS, max_wait=1.0)
        except Exception as exc:
            # A database outage must not stop the loop; worlds keep ticking (and
            # their own ticks will fail and back off if the database is gone).
            log.error("world_discovery_failed", error=first_line(exc))
            self._count_db_error(exc, "discovery")
        finally:
            self.discovered.set()
