"""``WorldScheduler``: one tick of one world = load ─► decide (pure) ─► commit.

This is the only module that combines the pure core (``context``,
``simulation/``) with the store. A tick's NPC updates and the new world time
commit in one transaction; the in-memory context changes only after the commit
succeeded, so a failed tick leaves database and context exactly as they were.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from scheduler_daemon.context import AdvancePlan, TickOutcome, WorldSimulationContext
from scheduler_daemon.simulation.behavior import (
    BehaviorContent,
    DecideFn,
    decide,
    parse_behavior,
    simulate_batch,
)
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcState
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


class WorldScheduler:
    """Registers worlds and ticks them against a :class:`Store`.

    ``defaults`` is the raw camelCase simulation config used under each world's
    own (``[defaults.simulation]`` in the daemon's settings). ``decide_fn`` is
    the behaviour function (see :mod:`scheduler_daemon.simulation.behavior`).
    """

    def __init__(
        self,
        store: Store,
        *,
        defaults: Mapping[str, Any] | None = None,
        decide_fn: DecideFn = decide,
    ) -> None:
        self.store = store
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.decide_fn = decide_fn
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
            outcome.state_written = False
            return outcome
        config = ctx.config
        now = plan.world_time_after
        async with self.store.transaction() as conn:
            due = await self.store.select_due_npcs(conn, ctx.world_id, now, config.max_npc_ticks_per_step)
            decisions = simulate_batch(due, entry.behavior, now, config.tiers.intervals(), self.decide_fn)
            await self.store.write_decisions(conn, ctx.world_id, decisions)
            await self.store.advance_world_state(
                conn, ctx.world_id, world_time=now, expected_ticks=ctx.ticks_processed, advanced_at=wall_at_start
            )
        outcome.npcs_simulated = len(decisions)
        _count_tiers(due, now, outcome)
        return outcome


def _count_tiers(due: list[NpcState], now: float, outcome: TickOutcome) -> None:
    for npc in due:
        outcome.npcs_per_tier[npc.tier] = outcome.npcs_per_tier.get(npc.tier, 0) + 1
        lag = now - npc.next_decision_at
        if lag > outcome.decision_lag_per_tier.get(npc.tier, -1.0):
            outcome.decision_lag_per_tier[npc.tier] = lag
