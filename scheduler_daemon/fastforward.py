"""Fast-forward one world: the real tick pipeline on a virtual clock (``simulate``).

The world is registered with a :class:`~scheduler_daemon.scheduler.WorldScheduler`
and ticked by a :class:`~scheduler_daemon.runner.SchedulerLoopRunner` on a
:class:`~scheduler_daemon.clock.VirtualClock`, exactly as the daemon would tick
it (same config, budgets, tiers, behaviour, transactions), only without
waiting between ticks. Tiers are refreshed every ``discovery_interval_seconds``
of virtual real time, as discovery does in the daemon.

``dry_run`` copies the world's rows (every table keyed by ``world_id``) into a
temporary SQLite database and simulates there, so nothing in the real
database changes, whichever backend it is. Otherwise the ticks commit to the
real database; a world ticked recently (probably by a running daemon) is
refused unless forced. Even then the tick fence (``world_states.ticks``)
makes sure no tick is ever applied twice: whichever of the two writers loses
a race stops with an error instead.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeAlias

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.plugins import Plugins
from scheduler_daemon.runner import RunnerLimits
from scheduler_daemon.runtime import build_runtime
from scheduler_daemon.scheduler import CommittedTick
from scheduler_daemon.settings import Settings
from scheduler_daemon.simulation.summary import SimulationSummary, SummaryCollector
from scheduler_daemon.store.repository import Store

__all__ = [
    "MAX_GAME_HOURS",
    "MAX_TICKS",
    "RECENT_TICK_SECONDS",
    "FastForwardError",
    "FastForwardProgress",
    "fast_forward",
]

#: Refuse to commit to a world whose last tick is younger than this (wall seconds).
RECENT_TICK_SECONDS = 30.0
#: Upper bound of one simulation (a game year).
MAX_GAME_HOURS = 24.0 * 366
#: Refuse simulations needing more ticks than this (a tiny timeScale).
MAX_TICKS = 2_000_000
# World time left below this after the grid ticks is rounding, not a tick.
_EPSILON_GAME_SECONDS = 1e-6


#: ``progress(game_seconds_done, ticks)``: called after each committed tick.
FastForwardProgress: TypeAlias = Callable[[float, int], None]


class FastForwardError(RuntimeError):
    """The simulation cannot run or was stopped; the message says why."""


@dataclass(frozen=True, slots=True)
class _Plan:
    world_id: int
    game_hours: float
    dry_run: bool


async def fast_forward(
    store: Store,
    world_id: int,
    game_hours: float,
    *,
    dry_run: bool,
    force: bool = False,
    settings: Settings | None = None,
    plugins: Plugins | None = None,
    progress: FastForwardProgress | None = None,
) -> SimulationSummary:
    """Simulate ``game_hours`` of world ``world_id`` as fast as possible.

    ``settings`` give the defaults, the hand-off timeout and the tier refresh
    period (``discovery_interval_seconds``), as in the daemon. Committed runs
    hand claimed generation requests to the plugins' sink like the daemon; a
    dry run never calls it (its claims stay in the copy).

    Raises :class:`~scheduler_daemon.store.errors.WorldNotFoundError`,
    :class:`~scheduler_daemon.world_config.WorldConfigError` or
    :class:`~scheduler_daemon.simulation.behavior.BehaviorContentError` (invalid
    stored content), and :class:`FastForwardError` (paused world, recent
    ticks by someone else, a failed tick).

    ``progress(game_seconds_done, ticks)`` is called after each committed tick.
    """
    if not 0 < game_hours <= MAX_GAME_HOURS:
        raise FastForwardError(f"game hours must be > 0 and <= {MAX_GAME_HOURS:g}, got {game_hours:g}")
    plan = _Plan(world_id, game_hours, dry_run)
    settings = settings or Settings()
    plugins = plugins or Plugins()
    if not dry_run:
        record = await store.get_world(world_id)
        if not force and record.last_advanced_at is not None:
            last = record.last_advanced_at
            if last.tzinfo is None:  # SQLite hands back naive UTC
                last = last.replace(tzinfo=UTC)
            age = (datetime.now(UTC) - last).total_seconds()
            if age < RECENT_TICK_SECONDS:
                raise FastForwardError(
                    f"world {world_id} was ticked {age:.0f}s ago, probably by a running daemon; "
                    "stop it first, or use --dry-run (a copy), or --force"
                )
        return await _run(store, plan, settings, plugins, progress)
    data = await store.export_world(world_id)
    with tempfile.TemporaryDirectory(prefix="scheduler-simulate-") as tmp:
        copy = Store.from_url(f"sqlite+aiosqlite:///{Path(tmp) / 'simulate.db'}")
        try:
            await copy.upgrade()
            await copy.import_world(data)
            # The default sink calls no one: the copy's claims stay in the copy.
            return await _run(copy, plan, settings, Plugins(decide_fn=plugins.decide_fn), progress)
        finally:
            await copy.dispose()


async def _run(
    store: Store, plan: _Plan, settings: Settings, plugins: Plugins, progress: FastForwardProgress | None
) -> SimulationSummary:
    started = time.perf_counter()  # wall time for the report only
    collector: SummaryCollector | None = None
    start_world_time = 0.0
    ticks = 0

    def observe(tick: CommittedTick) -> None:
        nonlocal ticks
        if collector is not None:
            collector.observe(tick.npcs, tick.decisions, tick.decision_lag_per_tier)
            ticks += 1
            if progress is not None:
                progress(tick.world_time - start_world_time, ticks)

    clock = VirtualClock()
    discovery_interval_seconds = settings.scheduler.discovery_interval_seconds
    # One batch at a time; no backoff retries: a failing tick stops the simulation (see below).
    limits = RunnerLimits(max_concurrent_ticks=1, discovery_interval_seconds=discovery_interval_seconds)
    runtime = build_runtime(settings, store, clock, plugins=plugins, limits=limits)
    scheduler, runner = runtime.scheduler, runtime.runner
    scheduler.on_commit = observe
    await runner.add_world(plan.world_id)
    try:
        ctx = scheduler.get_context(plan.world_id)
        if ctx.paused:
            raise FastForwardError(f"world {plan.world_id} is paused (pauseSimulation); its clock cannot advance")
        record = await store.get_world(plan.world_id)
        start_world_time = ctx.current_world_time
        collector = SummaryCollector.starting_from(start_world_time, await store.get_npcs(plan.world_id))
        target = ctx.current_world_time + plan.game_hours * 3600.0
        real_end = plan.game_hours * 3600.0 / ctx.config.time_scale
        if real_end / ctx.config.tick_interval_seconds > MAX_TICKS:
            raise FastForwardError(
                f"world {plan.world_id}: {plan.game_hours:g} game hours at timeScale {ctx.config.time_scale:g} "
                f"need more than {MAX_TICKS} ticks; simulate fewer hours"
            )
        while clock.now() < real_end:
            await runner.run_until(min(clock.now() + discovery_interval_seconds, real_end))
            if runner.ticks_failed:
                raise FastForwardError(f"world {plan.world_id}: a tick failed: {ctx.last_error}")
            await runner.refresh_tiers()
        # The grid's last tick may end short of the target: one partial tick.
        remaining = target - ctx.current_world_time
        if remaining > _EPSILON_GAME_SECONDS:
            try:
                await scheduler.tick_world(plan.world_id, remaining / ctx.config.time_scale)
            except Exception as exc:
                raise FastForwardError(f"world {plan.world_id}: the last tick failed: {exc}") from exc
        return collector.summary(
            world_id=plan.world_id,
            world_name=record.name,
            dry_run=plan.dry_run,
            game_hours=plan.game_hours,
            end_world_time=ctx.current_world_time,
            tier_population=ctx.tier_population,
            lag_episodes=ctx.lag_episodes,
            wall_seconds=time.perf_counter() - started,
        )
    finally:
        await runner.shutdown()
