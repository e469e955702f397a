"""One world's tick: its body inside the group's transaction, and applying it after the COMMIT.

The body (lease fence, quarantine, decide, chain steps, generation claims)
is pure transactional work, safe to re-run after a rollback: its log events
are collected and emitted only by :meth:`TickBody._apply`, after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.context import TickOutcome, WorldSimulationContext
from scheduler_daemon.logs import get_logger
from scheduler_daemon.scheduler.base import SchedulerBase
from scheduler_daemon.scheduler.results import CommittedTick, TickResult, _Body, _GroupReads, _Planned
from scheduler_daemon.scheduler.tiers import log_quarantine
from scheduler_daemon.simulation.behavior import simulate_batch
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.store.generation import ClaimResult

log = get_logger("scheduler_daemon.scheduler")

# A tick whose world has no pending request (never mutated).
_NOTHING_CLAIMED: Final = ClaimResult(claimed=[], rejected=[], in_flight=0)


class TickBody(SchedulerBase):
    """A world's tick body (``_tick_body``, ``_finish_body``) and its application to the context (``_apply``)."""

    async def _tick_body(self, conn: AsyncConnection, planned: _Planned, reads: _GroupReads) -> _Body:
        """A world's tick up to its NPC and clock writes, inside the (grouped) transaction.

        Its due NPCs, whether it has chain steps or generation claims to do,
        and how long NPCs left waiting have waited were read for the whole
        group (``reads``). Every statement here filters by this world's id.
        """
        entry, plan = planned.entry, planned.plan
        ctx = entry.context
        outcome = TickOutcome()
        planned.events.clear()  # from a rolled-back run of this body
        config = ctx.config
        now = plan.world_time_after
        due = reads.due[ctx.world_id]
        pending = reads.pending[ctx.world_id]
        with structlog.contextvars.bound_contextvars(world_id=ctx.world_id):  # on every log line of this body
            if entry.lease is not None:
                # Lock the state row under our lease before any write, so a lost
                # lease writes nothing and no claim can slip in before COMMIT.
                await self.store.fence_tick(conn, entry.lease)
            bad = reads.quarantined.get(ctx.world_id)
            if bad:
                # Out of the selection until fixed; its row itself is left as it is.
                await self.store.write_tier_changes(conn, {ctx.world_id: {q.npc_id: (Tier.FROZEN, None) for q in bad}})
                outcome.quarantined = {q.npc_id: q.problem for q in bad}
            _count_tiers(due, now, outcome)
            for tier, next_at in reads.waiting.get(ctx.world_id, {}).items():
                lag = now - next_at
                outcome.waiting_lag_per_tier[tier] = lag
                outcome.decision_lag_per_tier[tier] = max(lag, outcome.decision_lag_per_tier.get(tier, lag))
            decisions = simulate_batch(due, entry.behavior, now, ctx.tier_intervals, self.decide_fn)
            # Chains and generation claims commit with the world time they
            # happened at, under the same fence (the clock move after them).
            if pending.chains:
                outcome.chain_steps = await self._advance_chains(conn, ctx, now, planned.events)
            claim = _NOTHING_CLAIMED
            if pending.requests:
                claim = await self.store.claim_requests(
                    conn,
                    ctx.world_id,
                    now,
                    max_ops=config.max_job_ops_per_step,
                    max_in_flight_per_world=config.generation.max_in_flight_per_world,
                    max_in_flight_per_user=config.generation.max_in_flight_per_user,
                )
        return _Body(outcome, due, decisions, claim)

    def _finish_body(self, planned: _Planned, body: _Body) -> TickOutcome:
        """After the world's writes (still inside the transaction): its outcome and log events."""
        ctx = planned.entry.context
        outcome, due, decisions, claim = body.outcome, body.due, body.decisions, body.claim
        now = planned.plan.world_time_after
        outcome.npcs_simulated = len(decisions)
        outcome.jobs_enqueued = len(claim.claimed)
        if claim.rejected:
            planned.events.append(
                (
                    logging.ERROR,
                    "generation_requests_rejected",
                    {
                        "request_ids": [rid for rid, _ in claim.rejected],
                        "errors": [reason for _, reason in claim.rejected],
                    },
                )
            )
        if claim.claimed:
            planned.events.append(
                (
                    logging.DEBUG,
                    "generation_requests_claimed",
                    {"request_ids": claim.claimed, "in_flight": claim.in_flight},
                )
            )
        _track_changes(due, decisions, ctx.tier_relevant_locations, outcome)
        # Set on every (re-)run of the body; reset by tick_worlds if the world fails after all.
        planned.entry.last_committed = (
            CommittedTick(ctx.world_id, now, due, decisions, dict(outcome.decision_lag_per_tier))
            if self.on_commit is not None
            else None
        )
        return outcome

    def _apply(self, planned: _Planned, outcome: TickOutcome, *, debug: bool) -> TickResult:
        """After COMMIT: move the world's context and describe the tick."""
        ctx = planned.entry.context
        plan = planned.plan
        outcome.duration_ms = (time.perf_counter() - planned.started) * 1000.0
        was_lagging = ctx.lagging_tiers
        if outcome.quarantined:
            log_quarantine(ctx.world_id, ctx.quarantined_npcs, {**ctx.quarantined_npcs, **outcome.quarantined})
        ctx.apply_tick(plan, outcome, advanced_at=planned.wall_at_start)
        _log_lag_transition(ctx, was_lagging, outcome.waiting_lag_per_tier)
        entry = planned.entry
        for level, event, fields in planned.events:
            log.log(level, event, world_id=ctx.world_id, **fields)
        if self.on_commit is not None and entry.last_committed is not None:
            try:
                self.on_commit(entry.last_committed)
            except Exception:
                # The tick is committed; an observer's bug must not fail it.
                log.exception("tick_listener_failed", world_id=ctx.world_id)
            entry.last_committed = None
        if debug:
            log.debug(
                "tick",
                world_id=ctx.world_id,
                world_time=plan.world_time_after,
                delta_game_seconds=plan.delta_game_seconds,
                delta_real_seconds=plan.delta_real_seconds,
                ticks=ctx.ticks_processed,
                lease_epoch=planned.entry.lease.epoch if planned.entry.lease else None,
                time_scale=ctx.config.time_scale,
                npcs=outcome.npcs_simulated,
                per_tier={t.label: n for t, n in outcome.npcs_per_tier.items()},
                duration_ms=round(outcome.duration_ms, 3),
            )
            if outcome.npcs_simulated >= ctx.config.max_npc_ticks_per_step > 0:
                log.debug(
                    "npc_budget_exhausted",
                    world_id=ctx.world_id,
                    max_npc_ticks_per_step=ctx.config.max_npc_ticks_per_step,
                )
        return TickResult(
            world_id=ctx.world_id,
            world_time_before=plan.world_time_before,
            world_time_after=plan.world_time_after,
            delta_real_seconds=plan.delta_real_seconds,
            delta_game_seconds=plan.delta_game_seconds,
            npcs_simulated=outcome.npcs_simulated,
            jobs_enqueued=outcome.jobs_enqueued,
            chain_steps=outcome.chain_steps,
            npcs_per_tier={t.label: outcome.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            duration_ms=outcome.duration_ms,
            capped=plan.capped,
            paused=ctx.paused,
        )


def _count_tiers(due: list[NpcState], now: float, outcome: TickOutcome) -> None:
    for npc in due:
        outcome.npcs_per_tier[npc.tier] = outcome.npcs_per_tier.get(npc.tier, 0) + 1
        lag = now - npc.next_decision_at
        if lag > outcome.decision_lag_per_tier.get(npc.tier, -1.0):
            outcome.decision_lag_per_tier[npc.tier] = lag


def _track_changes(
    due: Sequence[NpcState], decisions: Sequence[NpcDecision], relevant: frozenset[str], outcome: TickOutcome
) -> None:
    """Activity count changes, and whether a move can change someone's tier."""
    delta = outcome.activity_delta
    for npc, decision in zip(due, decisions, strict=True):
        if npc.current_activity != decision.current_activity:
            delta[npc.current_activity] = delta.get(npc.current_activity, 0) - 1
            delta[decision.current_activity] = delta.get(decision.current_activity, 0) + 1
        if npc.location != decision.location and (npc.location in relevant or decision.location in relevant):
            outcome.tier_inputs_moved = True


def _log_lag_transition(
    ctx: WorldSimulationContext, was_lagging: frozenset[Tier], waiting_lag: dict[Tier, float]
) -> None:
    """WARNING once when a world starts lagging, INFO once when it recovers.

    Lagging is about NPCs the budget left waiting (``waiting_lag_seconds``);
    the NPCs decided in the tick that recovers may still have been long
    overdue (``decided_lag_seconds``, a backlog being cleared).
    """
    if ctx.lagging_tiers and not was_lagging:
        log.warning(
            "npc_decision_lag",
            lagging_tiers=[t.label for t in sorted(ctx.lagging_tiers)],
            waiting_lag_seconds=_by_label(waiting_lag),
            decision_lag_seconds=_by_label(ctx.decision_lag_per_tier),
            max_npc_ticks_per_step=ctx.config.max_npc_ticks_per_step,
            hint="raise maxNpcTicksPerStep or the lower tiers' decisionIntervalSeconds, or lower their maxNpcs",
        )
    elif was_lagging and not ctx.lagging_tiers:
        log.info(
            "npc_decision_lag_recovered",
            recovered_tiers=[t.label for t in sorted(was_lagging)],
            waiting_lag_seconds=_by_label(waiting_lag),
            decided_lag_seconds=_by_label(ctx.decision_lag_per_tier),
        )


def _by_label(lags: dict[Tier, float]) -> dict[str, float]:
    return {t.label: round(v, 1) for t, v in sorted(lags.items())}
