"""Ticking a batch of worlds in one grouped commit, and what each world's outcome does to its schedule."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from scheduler_daemon.logs import get_logger
from scheduler_daemon.retry import first_line, retry_after
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.discovery import UNIT_ATTEMPTS
from scheduler_daemon.runner.state import Slot, touched_database
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError
from scheduler_daemon.store.errors import (
    LeaseLostError,
    StaleWorldStateError,
    WorldNotFoundError,
    is_database_error,
    is_transient,
)

log = get_logger("scheduler_daemon.runner")


class BatchTicking(RunnerBase):
    """Ticks batches of due worlds and reschedules each by its outcome."""

    async def _tick_batch(self, batch: list[tuple[Slot, float]]) -> None:
        """Tick a batch of worlds in one call of ``scheduler.tick_worlds`` (one grouped commit).

        Each world keeps its own outcome: the engine commits every world
        that succeeded and rolls back only the ones that failed. A transient
        database error of the whole unit (serialization failure, lost
        connection) re-runs it, within the timeout. A timeout or another
        failure of the shared commit fails the whole batch (nothing of it was
        applied) without saying which world caused it: the worlds of such a
        batch are retried at once, each alone, so only the culprit fails its
        own tick and backs off while its neighbours lose just that time.
        """
        n = len(batch)
        outcomes = ["skipped"] * n  # skipped: never started (removed or stopping)
        results: list[TickResult | None] = [None] * n
        locked: list[Slot] = []
        started = self.clock.now()
        limit = self._limit
        holds_permit = False
        try:
            if not limit.try_acquire():
                await limit.acquire()
            holds_permit = True
            for slot, _ in batch:
                # Uncontended unless a config reload or removal of this world is in progress.
                if not slot.lock.try_acquire():
                    await slot.lock.acquire()
                locked.append(slot)
            if self._stopping:
                return  # queued ticks never start once stopping
            live = [i for i, (slot, _) in enumerate(batch) if not slot.removed]
            if not live:
                return
            for i in live:
                outcomes[i] = "error"
            live_slots = [batch[i][0] for i in live]
            started, answers = await self._commit_batch(live_slots)
            if answers is None:
                for i in live:
                    outcomes[i] = "retry"
                return
            await self._settle(live, live_slots, answers, started, outcomes, results)
        finally:
            if holds_permit:
                limit.release()
            for slot in locked:
                slot.lock.release()
            self._finish_batch(batch, outcomes, results, started)

    async def _commit_batch(self, slots: list[Slot]) -> tuple[float, Sequence[TickResult | BaseException] | None]:
        """Run the batch's grouped tick under the timeout; returns when it started and each world's answer.

        ``None`` instead of answers: the batch failed as a whole and its worlds
        are marked to be retried at once, each alone.
        """
        started = self.clock.now()
        # A timeout can hit the post-commit generation hand-off, after
        # ticks were committed and applied (see the except below).
        applied_before = [slot.ctx.ticks_processed for slot in slots]

        async def attempt() -> Sequence[TickResult | BaseException]:
            # Each attempt covers the real time up to its own start.
            nonlocal started
            started = now = self.clock.now()
            # The stamp (last_advanced_at) of that same moment, read before
            # anything can pause the process (a long GC would shift later stamps).
            wall = datetime.now(UTC)
            return await self.scheduler.tick_worlds(
                [(slot.world_id, max(now - slot.last_tick_at, 0.0)) for slot in slots], wall_at=wall
            )

        try:
            with self._timeouts.scope(self.limits.tick_timeout_seconds):
                if self.leases is not None:
                    # Overdue renewal (loop frozen?) is only noted: the fenced
                    # tick itself checks owner+epoch in the database and renews.
                    for slot in slots:
                        self.leases.check_overdue(slot.world_id)
                # The first attempt inlined (retry_transient's fast path, minus its call).
                try:
                    return started, await attempt()
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    answers = await retry_after(
                        exc,
                        "tick",
                        attempt,
                        max_attempts=UNIT_ATTEMPTS,
                        multiplier=0.05,
                        max_wait=0.5,
                        world_ids=[slot.world_id for slot in slots],
                    )
                    return started, answers
        except Exception as exc:
            for slot, before in zip(slots, applied_before, strict=True):
                if slot.ctx.ticks_processed > before:
                    # Committed and applied; only the hand-off was cut
                    # short. Its interval must not be counted twice.
                    slot.last_tick_at = started
            timeout = self.limits.tick_timeout_seconds
            if len(slots) > 1:
                # One event for the batch (world_ids): which world caused it is not known yet.
                log.error(
                    "tick_failed",
                    world_ids=[slot.world_id for slot in slots],
                    error="timeout" if isinstance(exc, TimeoutError) else first_line(exc),
                    tick_timeout_seconds=timeout,
                    retry="each world at once, alone",
                )
                for slot in slots:
                    slot.solo = True
                return started, None
            if isinstance(exc, TimeoutError):
                log.error("tick_timed_out", world_id=slots[0].world_id, tick_timeout_seconds=timeout)
            return started, [exc]

    async def _settle(
        self,
        live: list[int],
        slots: list[Slot],
        answers: Sequence[TickResult | BaseException],
        started: float,
        outcomes: list[str],
        results: list[TickResult | None],
    ) -> None:
        """Record each world's answer (``outcomes``/``results`` at the batch index in ``live``)."""
        committed = False
        for i, slot, answer in zip(live, slots, answers, strict=True):
            if not isinstance(answer, BaseException):
                outcomes[i] = "ok"
                results[i] = answer
                wrote = touched_database(answer)
                committed = committed or wrote
                slot.last_tick_at = started
                if self.leases is not None and wrote:
                    # Only a fenced write renews the lease; a frozen paused tick writes nothing.
                    self.leases.renewed_by_tick(slot.world_id, started)
            elif isinstance(answer, LeaseLostError):
                # Nothing was written (the fence failed first): drop the world at
                # once, unless the fence failed only because its state row was deleted
                # (recreated) or the world was (dropped as deleted).
                if await self._restored(slot) or slot.removed:
                    continue
                outcomes[i] = "lease_lost"
                await self._drop_lost_in_tick(slot, reason="fence")
            elif isinstance(answer, WorldNotRegisteredError):
                # Unregistered on the scheduler by hand (nothing was written): not a failure.
                outcomes[i] = "unregistered"
                self._forget_unregistered(slot)
            elif isinstance(answer, TimeoutError):
                outcomes[i] = "timeout"
            elif isinstance(answer, StaleWorldStateError):
                await self._resync(slot, answer)
            else:
                log.error("tick_failed", world_id=slot.world_id, exc_info=answer)
                self._tick_failed(answer)
        if committed:
            # Recorded after the batch's failed worlds: the COMMIT that followed their rollback succeeded.
            self.commits.committed(self.clock.now())

    def _finish_batch(
        self, batch: list[tuple[Slot, float]], outcomes: list[str], results: list[TickResult | None], started: float
    ) -> None:
        now = self.clock.now()
        duration = now - started
        observer = self.observer
        reschedule = not self._stopping
        deadlines = self._deadlines
        self.progress += 1
        for (slot, scheduled), outcome, result in zip(batch, outcomes, results, strict=True):
            slot.in_flight = False
            if slot.removed or outcome in ("skipped", "lease_lost", "unregistered"):
                continue  # a lost lease wrote nothing: not a failure, and the world is gone
            if outcome == "retry":
                # Its batch failed as a whole: tick again right away, alone.
                if reschedule:
                    self._push(slot, now)
                continue
            if observer:
                observer.tick_finished(slot.world_id, outcome, started - scheduled, duration, result)
            if outcome == "ok" and slot.retry_at is None and not slot.failures and not slot.solo:
                # The common case, inlined (it runs once per tick): next slot on the grid.
                self.ticks_ok += 1
                if reschedule:
                    slot.k += 1
                    slot.generation += 1
                    deadline = slot.anchor + slot.k * slot.interval
                    deadlines.push(deadline, slot.world_id, slot.generation)
                    if deadline < self._tick_timer_at:
                        self._arm_ticks(deadline)  # due before the tick timer: it must move
                continue
            if outcome == "ok":
                self.ticks_ok += 1
            else:
                self.ticks_failed += 1
            if reschedule:
                self._reschedule(slot, ok=outcome == "ok", now=now)

    async def _restored(self, slot: Slot) -> bool:
        try:
            return await self.scheduler.restore_missing_state(slot.world_id)
        except WorldNotFoundError:
            await self._drop_deleted(slot)
            return False
        except Exception as exc:
            log.error("world_state_check_failed", world_id=slot.world_id, error=first_line(exc))
            return False

    async def _resync(self, slot: Slot, refused: StaleWorldStateError) -> None:
        try:
            ctx = await self.scheduler.resync_world(slot.world_id)
        except WorldNotFoundError:
            await self._drop_deleted(slot)
            return
        except Exception:
            log.error("tick_refused_stale_state", world_id=slot.world_id, error=str(refused))
            log.exception("world_resync_failed", world_id=slot.world_id)
            return
        log.error("tick_refused_stale_state", world_id=slot.world_id, error=str(refused))
        # A tick we saw fail had committed: the next tick starts where it
        # started, or its interval would be counted twice.
        slot.last_tick_at += ctx.adopted_real_seconds

    async def _drop_deleted(self, slot: Slot) -> None:
        """Drop a world deleted by another writer (SQL, another daemon's API), from inside its tick."""
        log.info("world_deleted", world_id=slot.world_id)
        await self._unregister_held(slot)
        self.broken.pop(slot.world_id, None)
        if self.leases is not None:
            try:
                await self.leases.release([slot.world_id], reason="deleted")  # its lease went with its row
            except Exception as exc:
                log.warning("lease_release_failed", world_id=slot.world_id, error=first_line(exc))

    def _reschedule(self, slot: Slot, *, ok: bool, now: float) -> None:
        if ok:
            slot.failures = 0
            slot.solo = False
            if slot.retry_at is not None:
                # Recovered from backoff: start a fresh grid from this tick.
                slot.retry_at = None
                self._place(slot, slot.last_tick_at)
                slot.k = 1
            else:
                # If the tick overran into later slots, dispatch serves the
                # latest one and counts the others as missed.
                slot.k += 1
        else:
            slot.failures += 1
            backoff = min(self.limits.backoff_base_seconds * 2 ** (slot.failures - 1), self.limits.backoff_max_seconds)
            slot.retry_at = now + max(backoff, slot.interval)
            log.warning("world_backed_off", world_id=slot.world_id, failures=slot.failures, retry_in_seconds=backoff)
        self._push(slot)

    def _tick_failed(self, exc: BaseException) -> None:
        """A tick's final failure: a database error is counted and makes ticks "failing" for readiness."""
        if is_database_error(exc):
            self.commits.failed(self.clock.now(), exc)
            if self.observer is not None:
                self.observer.db_error("tick")
