"""What a designer wants to know after fast-forwarding a world (pure, no I/O).

:class:`SummaryCollector` is fed every committed tick's decisions by
``scheduler-daemon simulate`` and produces a :class:`SimulationSummary`:
activities started per hour of day, energy and mood ranges, decisions per
tier, decision lag, frozen NPCs, and what every NPC is doing at the end.
The end state is computed from the start state plus the committed decisions,
so it can be checked against the database afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler_daemon.simulation.content import DAY_SECONDS, HOUR_SECONDS
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier

__all__ = ["Range", "SimulationSummary", "SummaryCollector", "hour_of_day"]

#: Shown for NPCs that have not decided anything yet (``current_activity`` NULL).
UNDECIDED = "(undecided)"


def hour_of_day(world_time: float) -> int:
    """Hour of the game day (0-23) of a world time."""
    return min(int((world_time % DAY_SECONDS) // HOUR_SECONDS), 23)


@dataclass(slots=True)
class Range:
    """Smallest and largest value seen (``None`` until the first one)."""

    low: float | None = None
    high: float | None = None

    def add(self, value: float) -> None:
        """Widen the range to include ``value``."""
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def to_dict(self) -> dict[str, float | None]:
        return {"min": self.low, "max": self.high}

    def render(self) -> str:
        if self.low is None or self.high is None:
            return "-"
        return f"{self.low:.1f} .. {self.high:.1f}"


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """The result of a fast-forward (see :meth:`to_dict` for the JSON shape)."""

    world_id: int
    world_name: str
    dry_run: bool
    game_hours: float
    start_world_time: float
    end_world_time: float
    ticks: int
    npcs: int
    decisions: int
    decisions_per_tier: dict[Tier, int]
    activities_per_hour: dict[int, dict[str, int]]
    energy: Range
    mood_valence: Range
    mood_arousal: Range
    max_decision_lag: dict[Tier, float]
    lag_episodes: int
    tier_population: dict[Tier, int]
    final_activities: dict[str, int]
    final_energy: Range
    final_mood_valence: Range
    final_mood_arousal: Range
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tiers and hours as string keys)."""
        return {
            "worldId": self.world_id,
            "worldName": self.world_name,
            "dryRun": self.dry_run,
            "gameHours": self.game_hours,
            "startWorldTime": self.start_world_time,
            "endWorldTime": self.end_world_time,
            "ticks": self.ticks,
            "npcs": self.npcs,
            "decisions": self.decisions,
            "decisionsPerTier": {t.label: self.decisions_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            "activitiesPerHour": {
                f"{h:02d}": dict(sorted(a.items())) for h, a in sorted(self.activities_per_hour.items())
            },
            "energy": self.energy.to_dict(),
            "moodValence": self.mood_valence.to_dict(),
            "moodArousal": self.mood_arousal.to_dict(),
            "maxDecisionLagSeconds": {
                t.label: self.max_decision_lag[t] for t in SIMULATED_TIERS if t in self.max_decision_lag
            },
            "lagEpisodes": self.lag_episodes,
            "tierPopulation": {t.label: self.tier_population.get(t, 0) for t in Tier},
            "frozenNpcs": self.tier_population.get(Tier.FROZEN, 0),
            "final": {
                "activities": dict(sorted(self.final_activities.items())),
                "energy": self.final_energy.to_dict(),
                "moodValence": self.final_mood_valence.to_dict(),
                "moodArousal": self.final_mood_arousal.to_dict(),
            },
            "wallSeconds": round(self.wall_seconds, 3),
        }

    def render(self, format_time: Callable[[float], str] | None = None) -> str:
        """A plain-text report for a terminal (``format_time`` renders world times)."""
        fmt = format_time or (lambda t: f"{t:.0f}s")
        lines = [
            f'World {self.world_id} "{self.world_name}": {self.game_hours:g} game hours, '
            f"{fmt(self.start_world_time)} -> {fmt(self.end_world_time)}"
            + (" (dry run: nothing committed)" if self.dry_run else " (committed)"),
            f"{self.ticks} ticks, {self.decisions} decisions for {self.npcs} NPCs in {self.wall_seconds:.1f}s; "
            + "per tier: "
            + ", ".join(f"{t.label} {self.decisions_per_tier.get(t, 0)}" for t in SIMULATED_TIERS),
            "NPCs per tier now: "
            + ", ".join(f"{t.label} {self.tier_population.get(t, 0)}" for t in Tier)
            + f" ({self.tier_population.get(Tier.FROZEN, 0)} frozen: never simulated)",
            "",
            "Activities started per hour of day:",
        ]
        names = sorted({a for per in self.activities_per_hour.values() for a in per})
        if names:
            widths = [max(len(n), 5) for n in names]
            lines.append("hour  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True)))
            for hour in range(24):
                per = self.activities_per_hour.get(hour, {})
                cells = [(str(per[n]) if per.get(n) else ".").rjust(w) for n, w in zip(names, widths, strict=True)]
                lines.append(f"{hour:02d}    " + "  ".join(cells))
        else:
            lines.append("  (no decisions)")
        lag = ", ".join(
            f"{t.label} {self.max_decision_lag[t]:.0f}" for t in SIMULATED_TIERS if t in self.max_decision_lag
        )
        lines += [
            "",
            f"Over all decisions: energy {self.energy.render()}, mood valence {self.mood_valence.render()}, "
            f"arousal {self.mood_arousal.render()}",
            f"Longest decision lag (game s): {lag or '-'}"
            + (f"; budget overloaded {self.lag_episodes} time(s)" if self.lag_episodes else ""),
            "Doing now: "
            + ", ".join(f"{a} {n}" for a, n in sorted(self.final_activities.items(), key=lambda x: (-x[1], x[0]))),
            f"Now: energy {self.final_energy.render()}, mood valence {self.final_mood_valence.render()}, "
            f"arousal {self.final_mood_arousal.render()}",
        ]
        return "\n".join(lines)


@dataclass(slots=True)
class _Latest:
    activity: str
    energy: float
    valence: float
    arousal: float


@dataclass(slots=True)
class SummaryCollector:
    """Accumulates committed ticks into a :class:`SimulationSummary`."""

    start_world_time: float
    latest: dict[int, _Latest] = field(default_factory=dict)
    ticks: int = 0
    decisions: int = 0
    decisions_per_tier: dict[Tier, int] = field(default_factory=dict)
    activities_per_hour: dict[int, dict[str, int]] = field(default_factory=dict)
    energy: Range = field(default_factory=Range)
    mood_valence: Range = field(default_factory=Range)
    mood_arousal: Range = field(default_factory=Range)
    max_decision_lag: dict[Tier, float] = field(default_factory=dict)

    @classmethod
    def starting_from(cls, world_time: float, npcs: Iterable[NpcState]) -> SummaryCollector:
        """A collector whose end state starts as ``npcs`` are now."""
        collector = cls(start_world_time=world_time)
        for npc in npcs:
            collector.latest[npc.id] = _Latest(
                npc.current_activity or UNDECIDED, npc.energy, npc.mood_valence, npc.mood_arousal
            )
        return collector

    def observe(
        self, npcs: Sequence[NpcState], decisions: Sequence[NpcDecision], decision_lag: Mapping[Tier, float]
    ) -> None:
        """Record one committed tick: the NPCs as selected and their decisions."""
        self.ticks += 1
        for npc, decision in zip(npcs, decisions, strict=True):
            self.decisions += 1
            self.decisions_per_tier[npc.tier] = self.decisions_per_tier.get(npc.tier, 0) + 1
            activity = decision.current_activity or UNDECIDED
            per_hour = self.activities_per_hour.setdefault(hour_of_day(decision.decided_at), {})
            per_hour[activity] = per_hour.get(activity, 0) + 1
            self.energy.add(decision.energy)
            self.mood_valence.add(decision.mood_valence)
            self.mood_arousal.add(decision.mood_arousal)
            self.latest[decision.npc_id] = _Latest(
                activity, decision.energy, decision.mood_valence, decision.mood_arousal
            )
        for tier, lag in decision_lag.items():
            self.max_decision_lag[tier] = max(lag, self.max_decision_lag.get(tier, lag))

    def summary(
        self,
        *,
        world_id: int,
        world_name: str,
        dry_run: bool,
        game_hours: float,
        end_world_time: float,
        tier_population: Mapping[Tier, int],
        lag_episodes: int,
        wall_seconds: float,
    ) -> SimulationSummary:
        """The summary so far."""
        final_activities: dict[str, int] = {}
        final_energy, final_valence, final_arousal = Range(), Range(), Range()
        for state in self.latest.values():
            final_activities[state.activity] = final_activities.get(state.activity, 0) + 1
            final_energy.add(state.energy)
            final_valence.add(state.valence)
            final_arousal.add(state.arousal)
        return SimulationSummary(
            world_id=world_id,
            world_name=world_name,
            dry_run=dry_run,
            game_hours=game_hours,
            start_world_time=self.start_world_time,
            end_world_time=end_world_time,
            ticks=self.ticks,
            npcs=len(self.latest),
            decisions=self.decisions,
            decisions_per_tier=dict(self.decisions_per_tier),
            activities_per_hour={h: dict(a) for h, a in self.activities_per_hour.items()},
            energy=self.energy,
            mood_valence=self.mood_valence,
            mood_arousal=self.mood_arousal,
            max_decision_lag=dict(self.max_decision_lag),
            lag_episodes=lag_episodes,
            tier_population=dict(tier_population),
            final_activities=final_activities,
            final_energy=final_energy,
            final_mood_valence=final_valence,
            final_mood_arousal=final_arousal,
            wall_seconds=wall_seconds,
        )
