"""``WorldScheduler``: one tick of one world = load ─► decide (pure) ─► commit.

This is the only module that combines the pure core (``context``,
``simulation/``) with the store. A tick's NPC updates and the new world time
commit in one transaction; the in-memory context changes only after the commit
succeeded, so a failed tick leaves database and context exactly as they were.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.context import AdvancePlan, TickOutcome, WorldSimulationContext
from scheduler_daemon.jobs import GenerationSink, leave_enqueued
from scheduler_daemon.simulation import chains as chain_logic
from scheduler_daemon.simulation import generation as gen_logic
from scheduler_daemon.simulation.behavior import (
    BehaviorContent,
    DecideFn,
    decide,
    parse_behavior,
    simulate_batch,
)
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcState
from scheduler_daemon.store import chains as chain_sql
from scheduler_daemon.store import jobs as job_sql
from scheduler_daemon.store.repository import StaleWorldStateError, Store, WorldRecord
from scheduler_daemon.world_config import WorldConfig, parse_world_config

log = structlog.get_logger("scheduler_daemon.scheduler")


class WorldNotRegisteredError(LookupError):
    """The world is not registered with this scheduler."""

    def __init__(self, world_id: int) -> None:
        self.world_id = world_id
        super().__init__(f"world {world_id} is not registered")


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did (returned by :meth:`WorldScheduler.tick_world`)."""

    world_id: int
    world_time_before: float
    world_time_after: float
    delta_real_seconds: float
    delta_game_seconds: float
    npcs_simulated: int
    jobs_enqueued: int
    chain_steps: int
    npcs_per_tier: dict[str, int]
    duration_ms: float
    capped: bool
    paused: bool


@dataclass(slots=True)
class _World:
    context: WorldSimulationContext
    behavior: BehaviorContent
    extra: dict[str, Any] = field(default_factory=dict)
    # Claimed generation requests may await hand-off. True at registration, so
    # the first tick after a (re)start hands out what a crash left behind.
    outbox_pending: bool = True


class WorldScheduler:
    """Registers worlds and ticks them against a :class:`Store`.

    ``defaults`` is the raw camelCase simulation config used under each world's
    own (``[defaults.simulation]`` in the daemon's settings). ``decide_fn`` is
    the behaviour function (see :mod:`scheduler_daemon.simulation.behavior`).
    ``sink`` receives claimed generation requests after each tick's commit
    (see :mod:`scheduler_daemon.jobs`); one tick's hand-off stage takes at
    most ``sink_timeout_seconds``, the rest waits for the next tick.
    """

    def __init__(
        self,
        store: Store,
        *,
        defaults: Mapping[str, Any] | None = None,
        decide_fn: DecideFn = decide,
        sink: GenerationSink = leave_enqueued,
        sink_timeout_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.decide_fn = decide_fn
        self.sink = sink
        self.sink_timeout_seconds = sink_timeout_seconds
        self._worlds: dict[int, _World] = {}

    # ------------------------------------------------------------ registry
    def _load(self, record: WorldRecord) -> tuple[WorldConfig, BehaviorContent]:
        config = parse_world_config(record.simulation_raw, world_id=record.id, defaults=self.defaults)
        behavior = parse_behavior(record.id, record.meta.get("behavior"))
        return config, behavior

    async def register_world(self, world_id: int) -> WorldSimulationContext:
        """Load a world (creating its state row if missing) and start tracking it.

        Raises :class:`~scheduler_daemon.world_config.WorldConfigError` or
        :class:`~scheduler_daemon.simulation.behavior.BehaviorContentError` naming
        the world and the field when its stored config is invalid; the world is
        then not registered and nothing else is affected.
        """
        record = await self.store.ensure_world_state(world_id)
        config, behavior = self._load(record)
        ctx = WorldSimulationContext(
            world_id,
            config,
            world_time=float(record.world_time or 0.0),
            ticks=int(record.ticks or 0),
            config_version=record.config_version,
        )
        ctx.record_population(await self.store.tier_counts(world_id))
        self._worlds[world_id] = _World(ctx, behavior)
        log.info(
            "world registered",
            world_id=world_id,
            name=record.name,
            world_time=ctx.current_world_time,
            time_scale=config.time_scale,
            tick_interval_seconds=config.tick_interval_seconds,
            paused=config.pause_simulation,
        )
        return ctx

    async def reload_world(self, world_id: int, *, elapsed_real_since_tick: float = 0.0) -> WorldSimulationContext:
        """Re-read a registered world's config and behaviour from the database.

        The new config applies from now: the part of the current interval that
        already elapsed accrues at the old scale. On a validation error the old
        config stays in force and the error propagates.
        """
        entry = self._require(world_id)
        record = await self.store.get_world(world_id)
        config, behavior = self._load(record)
        entry.context.update_config(
            config, version=record.config_version, elapsed_real_since_tick=elapsed_real_since_tick
        )
        entry.behavior = behavior
        log.info(
            "world config applied",
            world_id=world_id,
            config_version=record.config_version,
            time_scale=config.time_scale,
            paused=config.pause_simulation,
        )
        return entry.context

    async def resync_world(self, world_id: int) -> WorldSimulationContext:
        """Reload a registered world's committed clock from the database.

        Used when a commit's outcome is unknown (e.g. the connection dropped
        during COMMIT) or the state row moved underneath us.
        """
        entry = self._require(world_id)
        record = await self.store.get_world(world_id)
        entry.context.resync(float(record.world_time or 0.0), int(record.ticks or 0))
        log.warning("world state resynchronised", world_id=world_id, world_time=record.world_time, ticks=record.ticks)
        return entry.context

    async def unregister_world(self, world_id: int) -> None:
        """Stop tracking a world. Its state is already persisted by every committed tick."""
        entry = self._worlds.pop(world_id, None)
        if entry is not None:
            log.info(
                "world unregistered",
                world_id=world_id,
                world_time=entry.context.current_world_time,
                ticks=entry.context.ticks_processed,
            )

    def _require(self, world_id: int) -> _World:
        try:
            return self._worlds[world_id]
        except KeyError:
            raise WorldNotRegisteredError(world_id) from None

    def get_context(self, world_id: int) -> WorldSimulationContext:
        """The registered world's context (raises :class:`WorldNotRegisteredError`)."""
        return self._require(world_id).context

    def get_all_contexts(self) -> dict[int, WorldSimulationContext]:
        return {wid: w.context for wid, w in self._worlds.items()}

    def is_registered(self, world_id: int) -> bool:
        return world_id in self._worlds

    def get_stats(self) -> dict[str, Any]:
        """Stats of every registered world."""
        return {
            "registered_worlds": len(self._worlds),
            "worlds": {wid: w.context.get_stats() for wid, w in self._worlds.items()},
        }

    # ---------------------------------------------------------------- tick
    async def tick_world(self, world_id: int, delta_real_seconds: float) -> TickResult:
        """Advance one world by ``delta_real_seconds`` of real time and commit it.

        Raises on failure after recording it in the context; the clock, the
        counters and every row stay as they were before the tick.
        """
        entry = self._require(world_id)
        ctx = entry.context
        with structlog.contextvars.bound_contextvars(world_id=world_id):
            started = time.perf_counter()
            # Wall time of the moment this tick's world time corresponds to (for humans).
            wall_at_start = datetime.now(UTC)
            plan = None
            try:
                plan = ctx.plan_advance(delta_real_seconds)
                outcome = await self._run_tick(entry, plan, wall_at_start)
            except BaseException as exc:
                ctx.record_failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                if plan is not None and not isinstance(exc, StaleWorldStateError):
                    ctx.record_unconfirmed(plan)
                raise
            outcome.duration_ms = (time.perf_counter() - started) * 1000.0
            ctx.apply_tick(plan, outcome)
            if outcome.jobs_enqueued:
                entry.outbox_pending = True
            if entry.outbox_pending:
                # Transactional outbox: only committed claims are handed out.
                await self._hand_off(entry)
            log.debug(
                "tick",
                world_time=plan.world_time_after,
                delta_game_seconds=plan.delta_game_seconds,
                delta_real_seconds=delta_real_seconds,
                time_scale=ctx.config.time_scale,
                npcs=outcome.npcs_simulated,
                per_tier={t.label: n for t, n in outcome.npcs_per_tier.items()},
                duration_ms=round(outcome.duration_ms, 3),
            )
            if outcome.npcs_simulated >= ctx.config.max_npc_ticks_per_step > 0:
                log.debug("npc budget exhausted", max_npc_ticks_per_step=ctx.config.max_npc_ticks_per_step)
        return TickResult(
            world_id=world_id,
            world_time_before=plan.world_time_before,
            world_time_after=plan.world_time_after,
            delta_real_seconds=delta_real_seconds,
            delta_game_seconds=plan.delta_game_seconds,
            npcs_simulated=outcome.npcs_simulated,
            jobs_enqueued=outcome.jobs_enqueued,
            chain_steps=outcome.chain_steps,
            npcs_per_tier={t.label: outcome.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            duration_ms=outcome.duration_ms,
            capped=plan.capped,
            paused=ctx.paused,
        )

    async def _run_tick(self, entry: _World, plan: AdvancePlan, wall_at_start: datetime) -> TickOutcome:
        ctx = entry.context
        outcome = TickOutcome()
        if plan.delta_game_seconds == 0.0 and ctx.paused:
            # Frozen clock: nothing can become due, nothing to write.
            return outcome
        config = ctx.config
        now = plan.world_time_after
        async with self.store.transaction() as conn:
            due = await self.store.select_due_npcs(conn, ctx.world_id, now, config.max_npc_ticks_per_step)
            decisions = simulate_batch(due, entry.behavior, now, config.tiers.intervals(), self.decide_fn)
            await self.store.write_decisions(conn, ctx.world_id, decisions)
            outcome.chain_steps = await self._advance_chains(conn, ctx, now)
            claim = await job_sql.claim_requests(
                conn,
                ctx.world_id,
                now,
                max_ops=config.max_job_ops_per_step,
                max_in_flight_per_world=config.generation.max_in_flight_per_world,
                max_in_flight_per_user=config.generation.max_in_flight_per_user,
            )
            await self.store.advance_world_state(
                conn, ctx.world_id, world_time=now, expected_ticks=ctx.ticks_processed, advanced_at=wall_at_start
            )
        outcome.jobs_enqueued = len(claim.claimed)
        if claim.rejected:
            log.error(
                "broken generation requests marked failed",
                request_ids=[rid for rid, _ in claim.rejected],
                errors=[reason for _, reason in claim.rejected],
            )
        if claim.claimed:
            log.debug("generation requests claimed", request_ids=claim.claimed, in_flight=claim.in_flight)
        outcome.npcs_simulated = len(decisions)
        _count_tiers(due, now, outcome)
        return outcome

    async def _advance_chains(self, conn: AsyncConnection, ctx: WorldSimulationContext, now: float) -> int:
        """Fire every due chain step in order (at most ``maxChainStepsPerStep``); returns steps fired.

        A chain row that cannot be read (broken steps JSON, impossible step
        index) is marked ``failed`` with the reason; the tick goes on.
        """
        budget = ctx.config.max_chain_steps_per_step
        due = await chain_sql.select_due_chains(conn, ctx.world_id, now, budget)
        updates: list[chain_sql.ChainUpdate] = []
        failures: list[tuple[int, str]] = []
        fired_total = 0
        for chain in due:
            if fired_total >= budget:
                break
            try:
                steps = chain_logic.parse_steps(chain.steps)
                if not isinstance(chain.fired, list):
                    raise chain_logic.ChainError(f"fired: expected a list, got {type(chain.fired).__name__}")
                advance = chain_logic.advance_chain(
                    chain.id, steps, chain.current_step, float(chain.next_step_at or 0.0), now, budget - fired_total
                )
            except chain_logic.ChainError as exc:
                failures.append((chain.id, f"invalid stored chain: {exc}"))
                continue
            fired_total += len(advance.fired)
            updates.append(
                chain_sql.ChainUpdate(
                    chain_id=chain.id,
                    current_step=advance.current_step,
                    next_step_at=advance.next_step_at,
                    status=chain_logic.COMPLETED if advance.completed else chain_logic.ACTIVE,
                    completed_at=now if advance.completed else None,
                    fired=[*chain.fired, *(f.to_wire() for f in advance.fired)],
                )
            )
            log.info(
                "chain steps fired",
                chain_id=chain.id,
                chain_key=chain.chain_key,
                steps=[f.index for f in advance.fired],
                world_time=now,
                completed=advance.completed,
            )
        await chain_sql.write_chain_updates(conn, ctx.world_id, updates)
        if failures:
            await chain_sql.fail_chains(conn, ctx.world_id, failures)
            log.error(
                "broken chains marked failed", chain_ids=[c for c, _ in failures], errors=[e for _, e in failures]
            )
        return fired_total

    async def _hand_off(self, entry: _World) -> None:
        """Hand committed claims to the sink (after the tick's commit; never raises).

        Accepted requests are marked handed off; a failing sink sends the
        request back to ``pending`` with ``attempts + 1`` and a backoff, or to
        ``failed`` after ``generation.maxAttempts``. Whatever is not done when
        the stage's time is up (or when the database fails) stays in the
        outbox for the next tick, and is handed out again with the same
        idempotency key.
        """
        ctx = entry.context
        config = ctx.config
        limit = max(config.generation.max_in_flight_per_world, config.max_job_ops_per_step, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sink_timeout_seconds
        try:
            async with self.store.engine.connect() as conn:
                batch = await job_sql.outbox(conn, ctx.world_id, limit)
            accepted: list[int] = []
            failed: list[tuple[job_sql.GenerationRequest, str]] = []
            for request in batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        result = self.sink(request)
                        if inspect.isawaitable(result):
                            await result
                except TimeoutError:
                    failed.append((request, f"sink timed out after {self.sink_timeout_seconds:g}s"))
                except Exception as exc:
                    failed.append((request, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
                else:
                    accepted.append(request.id)
            async with self.store.transaction() as conn:
                await job_sql.mark_handed_off(conn, ctx.world_id, accepted)
                for request, error in failed:
                    decision = gen_logic.retry_after_failure(
                        request.attempts,
                        max_attempts=config.generation.max_attempts,
                        backoff_base_seconds=config.generation.retry_backoff_seconds,
                        time_scale=config.time_scale,
                        world_time=ctx.current_world_time,
                    )
                    await job_sql.mark_handoff_failed(conn, ctx.world_id, request.id, decision, error)
                    log.warning(
                        "generation hand-off failed",
                        request_id=request.id,
                        attempts=decision.attempts,
                        gave_up=decision.failed,
                        retry_at_world_time=decision.not_before,
                        error=error,
                    )
        except Exception as exc:
            log.error(
                "generation hand-off interrupted; requests stay in the outbox", error=f"{type(exc).__name__}: {exc}"
            )
            return
        entry.outbox_pending = len(batch) >= limit or len(accepted) + len(failed) < len(batch)
        if accepted:
            log.info("generation requests handed off", count=len(accepted), request_ids=accepted)


def _count_tiers(due: list[NpcState], now: float, outcome: TickOutcome) -> None:
    for npc in due:
        outcome.npcs_per_tier[npc.tier] = outcome.npcs_per_tier.get(npc.tier, 0) + 1
        lag = now - npc.next_decision_at
        if lag > outcome.decision_lag_per_tier.get(npc.tier, -1.0):
            outcome.decision_lag_per_tier[npc.tier] = lag
