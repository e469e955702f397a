"""Ticking a group of worlds: plan each, commit them in one transaction, apply each, hand off.

A group commits in one transaction with per-world atomicity: the bodies run
under one optimistic savepoint, and only when one fails is every world re-run
under a savepoint of its own. One world's tick body is in :mod:`.body`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.context import TickOutcome
from scheduler_daemon.logs import get_logger
from scheduler_daemon.scheduler.base import SchedulerBase
from scheduler_daemon.scheduler.results import TickResult, WorldNotRegisteredError, _GroupReads, _Planned, _World
from scheduler_daemon.simulation.tiers import last_taken
from scheduler_daemon.store.errors import StaleWorldStateError, is_transient
from scheduler_daemon.store.ticks import WorldAdvance

log = get_logger("scheduler_daemon.scheduler")


class GroupTicking(SchedulerBase):
    """``tick_worlds``: a group of worlds in one grouped commit; ``tick_world``: a group of one."""

    async def tick_world(
        self, world_id: int, delta_real_seconds: float, *, wall_at: datetime | None = None
    ) -> TickResult:
        """Advance one world by ``delta_real_seconds`` of real time and commit it.

        Raises on failure after recording it in the context; the clock, the
        counters and every row stay as they were before the tick. ``wall_at``:
        see :meth:`tick_worlds`.
        """
        (answer,) = await self.tick_worlds([(world_id, delta_real_seconds)], wall_at=wall_at)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def tick_worlds(
        self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None
    ) -> list[TickResult | BaseException]:
        """Tick several worlds, ``(world_id, delta_real_seconds)`` each, in one grouped commit.

        Returns one answer per request, in order: the :class:`TickResult` of a
        committed tick, or the exception that failed that world. Every world's
        tick is atomic on its own: a world that fails is rolled back alone
        (its context untouched, the failure recorded) and its neighbours
        commit. An error of the shared transaction itself (the COMMIT, a lost
        connection, a cancellation) fails every world of the group and is
        raised. After the COMMIT, the committed worlds' claimed generation
        requests are handed to the sink (transactional outbox), the whole
        group's hand-off stage within ``sink_timeout_seconds``.

        ``wall_at`` is the wall time at which the deltas end, written as each
        world's ``last_advanced_at``. A caller measuring the deltas on its own
        clock (the runner) reads it at the same moment, so a pause of the
        process before or while the group is planned (a long garbage
        collection) cannot move the stamp away from the time the tick covers.
        Default: the wall clock, read once for the group before planning.
        """
        if wall_at is None:
            wall_at = datetime.now(UTC)
        answers: list[TickResult | BaseException | None] = [None] * len(requests)
        hand_off: list[_World] = []  # committed (or paused) worlds with outbox work
        # Checked once per group, not per world: even a filtered log call has a cost.
        debug = log.is_enabled_for(logging.DEBUG)
        work = self._plan_group(requests, wall_at, answers, hand_off, debug=debug)
        if work:
            await self._commit_and_apply(work, answers, hand_off, debug=debug)
        if hand_off:
            # Transactional outbox: only committed claims are handed out, after
            # the COMMIT; the whole group's hand-off shares one deadline.
            deadline = asyncio.get_running_loop().time() + self.sink_timeout_seconds
            for entry in hand_off:
                await self._hand_off(entry, deadline)
        return [a for a in answers if a is not None]

    def _plan_group(
        self,
        requests: Sequence[tuple[int, float]],
        wall_at: datetime,
        answers: list[TickResult | BaseException | None],
        hand_off: list[_World],
        *,
        debug: bool,
    ) -> list[_Planned]:
        """Plan each world's advance; returns the worlds to commit.

        A world that is not registered or cannot plan gets its exception as
        its answer. A paused world whose clock stands still has nothing to
        write: it is applied at once (and joins ``hand_off`` if its outbox
        has work).
        """
        work: list[_Planned] = []
        for index, (world_id, delta) in enumerate(requests):
            entry = self._worlds.get(world_id)
            if entry is None:
                answers[index] = WorldNotRegisteredError(world_id)
                continue
            try:
                plan = entry.context.plan_advance(delta)
            except Exception as exc:
                entry.context.record_failure(_describe(exc))
                answers[index] = exc
                continue
            planned = _Planned(index, entry, plan, time.perf_counter(), wall_at)
            entry.last_committed = None
            if plan.delta_game_seconds == 0.0 and entry.context.paused:
                # Frozen clock: nothing can become due, nothing to write (so no tick to count).
                answers[index] = self._apply(
                    planned, TickOutcome(selection_ran=False, state_written=False), debug=debug
                )
                if entry.outbox_pending:
                    hand_off.append(entry)
            else:
                work.append(planned)
        return work

    async def _commit_and_apply(
        self,
        work: list[_Planned],
        answers: list[TickResult | BaseException | None],
        hand_off: list[_World],
        *,
        debug: bool,
    ) -> None:
        """Commit the planned worlds as one group, then apply each committed tick and answer each world.

        A committed world with outbox work joins ``hand_off``. If the group's
        transaction itself fails, every world records the failure and the
        error is raised.
        """
        try:
            outcomes = await self._commit_group(work)
        except BaseException as exc:
            for planned in work:
                _record_failure(planned, exc)
            raise
        for planned, outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _record_failure(planned, outcome)
                answers[planned.index] = outcome
            else:
                answers[planned.index] = self._apply(planned, outcome, debug=debug)
                if outcome.jobs_enqueued:
                    planned.entry.outbox_pending = True
                if planned.entry.outbox_pending:
                    hand_off.append(planned.entry)

    async def _commit_group(self, work: list[_Planned]) -> list[TickOutcome | BaseException]:
        """One transaction for the group: batched due-NPC selection, then each world's tick body.

        Optimistic: all bodies run under one savepoint. Only if one of them
        fails is the group rolled back to it and every world re-run under a
        savepoint of its own, so a failing world costs its neighbours a retry,
        never their tick. (One savepoint per world up front would cost two
        extra round trips per world on every tick.)
        """
        async with self.store.transaction() as conn:
            selected = await self.store.select_due_npcs_many(
                conn,
                [
                    (p.entry.context.world_id, p.plan.world_time_after, p.entry.context.config.max_npc_ticks_per_step)
                    for p in work
                ],
            )
            due = selected.npcs
            full = [
                (p.entry.context.world_id, p.plan.world_time_after, last_taken(due[p.entry.context.world_id]))
                for p in work
                if len(due[p.entry.context.world_id]) >= p.entry.context.config.max_npc_ticks_per_step
            ]
            reads = _GroupReads(
                due=due,
                quarantined=selected.quarantined,
                pending=await self.store.due_work_many(
                    conn, [(p.entry.context.world_id, p.plan.world_time_after) for p in work]
                ),
                # The budget may have left due NPCs waiting: how long the oldest of each tier has waited.
                waiting=await self.store.oldest_waiting_many(conn, full),
            )
            if len(work) == 1:
                # The transaction is the unit of atomicity; an error fails it and is raised.
                return [await self._run_tick(conn, work[0], reads)]
            try:
                async with self.store.group_savepoint(conn):
                    return await self._run_group(conn, work, reads)
            except Exception as exc:
                if is_transient(exc) or conn.invalidated:
                    # The connection or transaction itself failed (not one world):
                    # re-running worlds on it only fails again; the whole unit is retried.
                    raise
                log.debug("grouped_tick_split", worlds=len(work))
            outcomes: list[TickOutcome | BaseException] = []
            for p in work:
                try:
                    async with conn.begin_nested():
                        outcomes.append(await self._run_tick(conn, p, reads))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes

    async def _run_tick(self, conn: AsyncConnection, planned: _Planned, reads: _GroupReads) -> TickOutcome:
        """One world's whole tick inside the transaction: body, then its own writes; raises to roll back."""
        body = await self._tick_body(conn, planned, reads)
        await self.store.write_decisions(conn, planned.entry.context.world_id, body.decisions, body.due)
        await self.store.advance_world_states(conn, [self._advance(planned)])
        return self._finish_body(planned, body)

    async def _run_group(
        self, conn: AsyncConnection, work: list[_Planned], reads: _GroupReads
    ) -> list[TickOutcome | BaseException]:
        """Every world's body, then all NPC writes and all clock moves as one statement each.

        Runs under the group's optimistic savepoint: any failure (including
        one world's stale or fenced-off state row) raises, and the caller
        re-runs each world alone under its own savepoint to isolate it.
        """
        bodies = [await self._tick_body(conn, p, reads) for p in work]
        await self.store.write_decisions_many(
            conn,
            [(p.entry.context.world_id, b.decisions) for p, b in zip(work, bodies, strict=True)],
            [b.due for b in bodies],
        )
        await self.store.advance_world_states(conn, [self._advance(p) for p in work])
        return [self._finish_body(p, b) for p, b in zip(work, bodies, strict=True)]

    @staticmethod
    def _advance(planned: _Planned) -> WorldAdvance:
        """The fenced clock move of one world's tick."""
        ctx = planned.entry.context
        return WorldAdvance(
            world_id=ctx.world_id,
            world_time=planned.plan.world_time_after,
            expected_ticks=ctx.ticks_processed,
            advanced_at=planned.wall_at_start,
            fence=planned.entry.lease.fence if planned.entry.lease is not None else None,
        )


def _record_failure(planned: _Planned, exc: BaseException) -> None:
    """A world whose tick did not commit records the failure; its clock and counters stay as they were."""
    planned.entry.last_committed = None
    planned.entry.context.record_failure(_describe(exc))
    if not isinstance(exc, StaleWorldStateError):
        # The COMMIT's outcome may be unknown (timeout, lost connection): a resync may find it committed.
        planned.entry.context.record_unconfirmed(planned.plan, planned.wall_at_start)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
