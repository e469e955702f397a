"""Per-world runtime state: the world clock, its config and counters. No I/O.

A tick is planned (:meth:`WorldSimulationContext.plan_advance`, pure), then
committed to the database, and only then applied here
(:meth:`WorldSimulationContext.apply_tick`). A failed commit therefore leaves
the context exactly as it was, and the next tick covers the lost time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, Tier
from scheduler_daemon.world_config import WorldConfig

_EWMA_ALPHA = 0.1  # weight of the newest tick in average_tick_duration_ms
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _by_name(item: tuple[str | None, int]) -> str:
    return item[0] or ""


def _same_instant(a: datetime, b: datetime) -> bool:
    # SQLite hands timestamps back naive (UTC); PostgreSQL aware.
    return (a if a.tzinfo else a.replace(tzinfo=UTC)) == (b if b.tzinfo else b.replace(tzinfo=UTC))


def format_world_time(world_time: float) -> str:
    """Human form of a world time, e.g. ``day 3 Wed 08:30`` (0 = Monday 00:00 of day 1)."""
    day, rest = divmod(max(world_time, 0.0), 86400.0)
    hours, rest = divmod(rest, 3600.0)
    return f"day {int(day) + 1} {_DAYS[int(day) % 7]} {int(hours):02d}:{int(rest // 60):02d}"


@dataclass(frozen=True, slots=True)
class AdvancePlan:
    """How far one tick moves the world clock (computed, not yet applied)."""

    delta_real_seconds: float
    effective_real_seconds: float  # after pause and the catch-up cap
    delta_game_seconds: float
    capped: bool
    world_time_before: float
    world_time_after: float


@dataclass(slots=True)
class TickOutcome:
    """What a committed tick did, recorded into the context's stats."""

    npcs_simulated: int = 0
    jobs_enqueued: int = 0
    chain_steps: int = 0
    npcs_per_tier: dict[Tier, int] = field(default_factory=dict)
    #: Per tier, the longest wait past ``next_decision_at`` seen this tick:
    #: of the NPCs decided, or of the oldest one the budget left waiting.
    decision_lag_per_tier: dict[Tier, float] = field(default_factory=dict)
    #: Per tier, the wait of the oldest NPC left waiting (absent: none waits).
    waiting_lag_per_tier: dict[Tier, float] = field(default_factory=dict)
    #: Change of the number of NPCs per current activity.
    activity_delta: dict[str | None, int] = field(default_factory=dict)
    #: An NPC moved to or from a place that tiering looks at.
    tier_inputs_moved: bool = False
    #: False when the tick did no selection at all (paused): lag state is kept.
    selection_ran: bool = True
    duration_ms: float = 0.0
    #: False when the tick wrote nothing (a paused world with a frozen clock):
    #: the committed tick counter, mirrored from ``world_states.ticks``, stays.
    state_written: bool = True
    #: NPC rows this tick found undecidable and froze: ``{npc_id: problem}``.
    quarantined: dict[int, str] = field(default_factory=dict)


class WorldSimulationContext:
    """Runtime context of one world: clock, effective config, counters.

    Time rules (ARCHITECTURE.md, "Time semantics"): a tick advances ``world_time`` by the real time
    elapsed since the previous tick × ``timeScale``, the real part capped at
    ``maxCatchUpSeconds``; a paused world's clock is frozen; a config change
    accepted mid-interval accrues the elapsed part of the interval at the old
    scale (see :meth:`update_config`).
    """

    def __init__(
        self,
        world_id: int,
        config: WorldConfig,
        *,
        world_time: float = 0.0,
        ticks: int = 0,
        config_version: int = 1,
        last_advanced_at: datetime | None = None,
    ) -> None:
        self.world_id = world_id
        self.config = config
        #: Decision interval per simulated tier, read on every tick: kept with the config.
        self.tier_intervals = config.tiers.intervals()
        self.config_version = config_version
        self.current_world_time = world_time
        self.ticks_processed = ticks  # committed ticks, mirrors world_states.ticks
        #: Wall time the committed world time corresponds to (mirrors ``world_states.last_advanced_at``;
        #: ``None``: never ticked). A runner adopting the world measures its first tick from it.
        self.last_advanced_at = last_advanced_at
        self.ticks_skipped = 0
        self.ticks_failed = 0
        self.npcs_simulated_last_tick = 0
        self.jobs_enqueued_last_tick = 0
        self.chain_steps_last_tick = 0
        self.npcs_simulated_total = 0
        self.npcs_per_tier: dict[Tier, int] = {}
        self.decision_lag_per_tier: dict[Tier, float] = {}
        self.tier_population: dict[Tier, int] = {}
        self.activity_counts: dict[str | None, int] = {}
        # Tier inputs as of the last assignment; see WorldScheduler.refresh_tiers.
        self.sessions_fingerprint: str | None = None
        self.tier_relevant_locations: frozenset[str] = frozenset()
        self.tiers_stale = False
        self.tier_refreshes = 0
        #: NPC rows that cannot be decided (kept frozen until fixed): ``{npc_id: problem}``.
        self.quarantined_npcs: dict[int, str] = {}
        # Tiers whose waiting NPCs fell behind (see apply_tick); an "episode"
        # lasts from the first such tick until no tier lags any more.
        self.lagging_tiers: frozenset[Tier] = frozenset()
        self.lag_episodes = 0
        self._lagging_before = False
        self.last_tick_duration_ms = 0.0
        self.average_tick_duration_ms = 0.0
        self.last_error: str | None = None
        self.consecutive_failures = 0
        # Game time already accrued in the current interval before a config
        # change, and the real seconds it covered.
        self._carry_real = 0.0
        self._carry_game = 0.0
        # Plans of failed ticks since the last confirmed one, with the stamp
        # each would have written: a tick can commit although we saw it fail
        # (timeout or disconnect during COMMIT).
        self._unconfirmed: list[tuple[AdvancePlan, datetime | None]] = []
        #: Real seconds covered by such a tick, found by the last :meth:`resync` (else 0).
        self.adopted_real_seconds = 0.0

    # ----------------------------------------------------------------- clock
    @property
    def paused(self) -> bool:
        return self.config.pause_simulation

    def plan_advance(self, delta_real_seconds: float) -> AdvancePlan:
        """Plan a tick covering ``delta_real_seconds`` of real time. Pure."""
        if delta_real_seconds < 0:
            raise ValueError(f"delta_real_seconds must be >= 0, got {delta_real_seconds}")
        cap = self.config.max_catch_up_seconds
        carry_real = min(self._carry_real, delta_real_seconds)
        carry_game = self._carry_game
        if carry_real > cap:  # the pre-change part alone exceeds the cap: prorate it
            carry_game = carry_game * cap / carry_real if carry_real > 0 else 0.0
            carry_real = cap
        rest_real = max(delta_real_seconds - self._carry_real, 0.0)
        rest_budget = max(cap - carry_real, 0.0)
        rest_eff = min(rest_real, rest_budget)
        rest_game = 0.0 if self.paused else rest_eff * self.config.time_scale
        delta_game = carry_game + rest_game
        return AdvancePlan(
            delta_real_seconds=delta_real_seconds,
            effective_real_seconds=carry_real + (0.0 if self.paused else rest_eff),
            delta_game_seconds=delta_game,
            capped=delta_real_seconds > cap,
            world_time_before=self.current_world_time,
            world_time_after=self.current_world_time + delta_game,
        )

    def apply_tick(
        self, plan: AdvancePlan, outcome: TickOutcome | None = None, *, advanced_at: datetime | None = None
    ) -> None:
        """Record a committed tick: move the clock and update stats.

        ``advanced_at`` is the ``last_advanced_at`` stamp the tick wrote.
        """
        if plan.world_time_before != self.current_world_time:
            raise RuntimeError(
                f"world {self.world_id}: stale tick plan "
                f"(planned from {plan.world_time_before}, clock at {self.current_world_time})"
            )
        outcome = outcome or TickOutcome()
        self._unconfirmed.clear()
        self.current_world_time = plan.world_time_after
        self._carry_real = 0.0
        self._carry_game = 0.0
        if outcome.state_written:
            self.ticks_processed += 1
            if advanced_at is not None:
                self.last_advanced_at = advanced_at
        self.npcs_simulated_last_tick = outcome.npcs_simulated
        self.npcs_simulated_total += outcome.npcs_simulated
        self.jobs_enqueued_last_tick = outcome.jobs_enqueued
        self.chain_steps_last_tick = outcome.chain_steps
        self.npcs_per_tier = dict(outcome.npcs_per_tier)
        if outcome.selection_ran:
            self.decision_lag_per_tier = dict(outcome.decision_lag_per_tier)
            self._update_lagging(outcome.waiting_lag_per_tier, plan.delta_game_seconds)
        for activity, change in outcome.activity_delta.items():
            count = self.activity_counts.get(activity, 0) + change
            if count:
                self.activity_counts[activity] = count
            else:
                self.activity_counts.pop(activity, None)
        if outcome.tier_inputs_moved:
            self.tiers_stale = True
        if outcome.quarantined:
            self.quarantined_npcs.update(outcome.quarantined)
            self.tiers_stale = True  # the frozen rows left their tiers: recount
        self.last_tick_duration_ms = outcome.duration_ms
        if self.ticks_processed == 1 or self.average_tick_duration_ms == 0.0:
            self.average_tick_duration_ms = outcome.duration_ms
        else:
            self.average_tick_duration_ms += _EWMA_ALPHA * (outcome.duration_ms - self.average_tick_duration_ms)
        self.last_error = None
        self.consecutive_failures = 0

    def update_config(
        self, config: WorldConfig, *, version: int | None = None, elapsed_real_since_tick: float = 0.0
    ) -> None:
        """Swap in a new config accepted ``elapsed_real_since_tick`` after the last tick.

        The part of the interval already elapsed accrues at the *old* scale
        (and not at all if the world was paused), so a speed change or a
        pause/resume never rewrites time that already passed.
        """
        segment = max(elapsed_real_since_tick - self._carry_real, 0.0)
        if not self.paused:
            self._carry_game += segment * self.config.time_scale
        self._carry_real = max(elapsed_real_since_tick, self._carry_real)
        self.config = config
        self.tier_intervals = config.tiers.intervals()
        if version is not None:
            self.config_version = version

    def record_unconfirmed(self, plan: AdvancePlan, advanced_at: datetime | None = None) -> None:
        """Remember the plan of a tick that failed without a known outcome (it may have committed).

        ``advanced_at`` is the ``last_advanced_at`` stamp the tick would have
        written: it tells apart failed ticks that would have left the same
        world time (two attempts that both hit ``maxCatchUpSeconds``).
        """
        if plan.world_time_before == self.current_world_time:
            self._unconfirmed = [*self._unconfirmed[-15:], (plan, advanced_at)]

    def resync(self, world_time: float, ticks: int, advanced_at: datetime | None = None) -> None:
        """Adopt the committed clock from the database (after an unknown commit outcome).

        If the database holds exactly the result of one of our failed ticks
        (its world time, and its stamp ``advanced_at`` where both are known),
        that tick did commit: :attr:`adopted_real_seconds` is then the real
        time it covered, so the caller measures the next tick from its start
        instead of covering that interval a second time.
        """
        adopted = next(
            (
                plan
                for plan, at in self._unconfirmed
                if ticks == self.ticks_processed + 1
                and plan.world_time_after == world_time
                and (at is None or advanced_at is None or _same_instant(at, advanced_at))
            ),
            None,
        )
        self.adopted_real_seconds = adopted.delta_real_seconds if adopted is not None else 0.0
        self._unconfirmed.clear()
        self.current_world_time = world_time
        self.ticks_processed = ticks
        self.last_advanced_at = advanced_at
        self._carry_real = 0.0
        self._carry_game = 0.0

    # ------------------------------------------------------------ bookkeeping
    def record_skipped(self, slots: int) -> None:
        """Count tick slots that passed without a tick (never burst-replayed)."""
        self.ticks_skipped += slots

    def record_failure(self, error: str) -> None:
        """Record a failed tick; the clock and committed counters stay as they were."""
        self.ticks_failed += 1
        self.consecutive_failures += 1
        self.last_error = error

    def record_tier_assignment(
        self,
        counts: Mapping[Tier, int],
        *,
        sessions_fingerprint: str,
        relevant_locations: frozenset[str],
        activity_counts: Mapping[str | None, int],
        quarantined: Mapping[int, str] | None = None,
    ) -> None:
        """Adopt a committed tier assignment and the inputs it was computed from.

        ``quarantined`` replaces the quarantine: the assignment read every NPC row.
        """
        self.tier_population = dict(counts)
        self.quarantined_npcs = dict(quarantined or {})
        self.sessions_fingerprint = sessions_fingerprint
        self.tier_relevant_locations = relevant_locations
        self.activity_counts = {k: v for k, v in activity_counts.items() if v}
        self.tiers_stale = False
        self.tier_refreshes += 1

    def _update_lagging(self, waiting_lag: Mapping[Tier, float], game_seconds_per_tick: float) -> None:
        # A tier lags when an NPC still waits longer past its due time than
        # both its own decision interval and one tick: normal tick granularity
        # and a start-up backlog the budget clears in time are not lag.
        intervals = self.tier_intervals
        self.lagging_tiers = frozenset(
            tier for tier, lag in waiting_lag.items() if lag > max(intervals[tier], game_seconds_per_tick)
        )
        if self.lagging_tiers and not self._lagging_before:
            self.lag_episodes += 1
        self._lagging_before = bool(self.lagging_tiers)

    @property
    def frozen_npcs(self) -> int:
        return self.tier_population.get(Tier.FROZEN, 0)

    @property
    def state(self) -> str:
        """``failing`` after a failed tick, else ``paused`` or ``running``."""
        if self.consecutive_failures:
            return "failing"
        return "paused" if self.paused else "running"

    def activity_snapshot(self) -> dict[str, Any]:
        """What the world's NPCs are doing now, for the periodic INFO summary.

        Counts are kept up to date from committed decisions (and recounted at
        every tier assignment), so this reads no database.
        """
        doing = sorted(self.activity_counts.items(), key=lambda kv: (-kv[1], kv[0] or ""))
        return {
            "world_time": format_world_time(self.current_world_time),
            "doing": {(name if name is not None else "undecided"): n for name, n in doing},
            "tiers": {t.label: self.tier_population.get(t, 0) for t in SIMULATED_TIERS},
            "frozen": self.frozen_npcs,
            "decisions_total": self.npcs_simulated_total,
            "lagging_tiers": [t.label for t in SIMULATED_TIERS if t in self.lagging_tiers],
        }

    def get_stats(self) -> dict[str, Any]:
        """Snapshot of the world's clock, counters and config (JSON-ready)."""
        return {
            "world_id": self.world_id,
            "state": self.state,
            "current_world_time": self.current_world_time,
            "ticks_processed": self.ticks_processed,
            "ticks_skipped": self.ticks_skipped,
            "ticks_failed": self.ticks_failed,
            "npcs_simulated_last_tick": self.npcs_simulated_last_tick,
            "npcs_simulated_total": self.npcs_simulated_total,
            "jobs_enqueued_last_tick": self.jobs_enqueued_last_tick,
            "chain_steps_last_tick": self.chain_steps_last_tick,
            "decisions_per_tier": {t.label: self.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            # Deprecated name of decisions_per_tier, kept one release.
            "npcs_per_tier": {t.label: self.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            "tier_population": {t.label: self.tier_population.get(t, 0) for t in Tier},
            "frozen_npcs": self.frozen_npcs,
            "decision_lag_seconds": {
                t.label: self.decision_lag_per_tier[t] for t in SIMULATED_TIERS if t in self.decision_lag_per_tier
            },
            "lagging_tiers": [t.label for t in SIMULATED_TIERS if t in self.lagging_tiers],
            "lag_episodes": self.lag_episodes,
            "activity_counts": {
                (name if name is not None else "undecided"): n
                for name, n in sorted(self.activity_counts.items(), key=_by_name)
            },
            "tier_refreshes": self.tier_refreshes,
            "quarantined_npcs": {str(npc): problem for npc, problem in sorted(self.quarantined_npcs.items())},
            "last_tick_duration_ms": self.last_tick_duration_ms,
            "average_tick_duration_ms": self.average_tick_duration_ms,
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
            "config_version": self.config_version,
            "config": self.config.to_wire(),
        }
