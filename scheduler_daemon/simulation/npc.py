"""Plain NPC values the pure core works on (no ORM objects, no I/O).

The store turns rows of the ``npcs`` table into :class:`NpcState` and writes
:class:`NpcDecision` values back; everything in between is pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Tier(IntEnum):
    """Simulation tier. Stored as a small integer so ``ORDER BY tier`` is priority order."""

    DETAILED = 0
    ACTIVE = 1
    AMBIENT = 2
    DORMANT = 3
    FROZEN = 4  # past every capacity: never selected, counted in stats

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Tier:
        return cls[label.upper()]


#: Tiers that are simulated, highest priority first.
SIMULATED_TIERS: tuple[Tier, ...] = (Tier.DETAILED, Tier.ACTIVE, Tier.AMBIENT, Tier.DORMANT)


@dataclass(slots=True)
class NpcState:
    """One NPC as loaded for a decision. Times are world time (game seconds)."""

    id: int
    world_id: int
    name: str
    tier: Tier
    next_decision_at: float
    location: str | None = None
    home: str | None = None
    routine: str | None = None
    current_activity: str | None = None
    activity_started_at: float | None = None
    energy: float = 100.0
    mood_valence: float = 0.0
    mood_arousal: float = 0.0
    last_decision_at: float | None = None
    decisions: int = 0
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NpcDecision:
    """The outcome of one decision: the NPC's new columns.

    ``decided_at`` is the world time the decision was taken at; it becomes
    ``last_decision_at`` and (with ``decisions + 1``) lets anyone check that
    each NPC's decision history is strictly increasing.
    """

    npc_id: int
    decided_at: float
    next_decision_at: float
    current_activity: str | None
    activity_started_at: float | None
    location: str | None
    energy: float
    mood_valence: float
    mood_arousal: float
    state: dict[str, Any] | None = None  # None: leave the stored JSON untouched
