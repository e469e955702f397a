"""Simulation tiers: who is simulated how closely, and who is decided next.

Pure functions only. :func:`assign_tiers` maps NPCs plus the world's active
player sessions to tiers under per-tier capacities; :func:`select_due` is the
reference model of the per-tick fair selection that the store's SQL mirrors.
:func:`sessions_fingerprint` and :func:`tier_relevant_locations` tell the
scheduler *when* tiers must be recomputed (never every tick).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcState, Tier

__all__ = [
    "NpcPlacement",
    "Relevance",
    "SessionView",
    "TierAssignment",
    "TierMatch",
    "TierRule",
    "assign_tiers",
    "determine_simulation_tier",
    "last_taken",
    "select_due",
    "sessions_fingerprint",
    "tier_relevant_locations",
]


@dataclass(frozen=True, slots=True)
class SessionView:
    """An active player session of the world, reduced to what tiering needs."""

    id: int
    user_id: str
    location: str | None
    scene_npc_ids: frozenset[int] = frozenset()
    #: NPCs the player has a relationship or quest with.
    involved_npc_ids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class NpcPlacement:
    """The minimal NPC facts tiering needs."""

    id: int
    location: str | None
    home: str | None


class Relevance(IntEnum):
    """Why an NPC has its natural tier; lower is more relevant (kept on demotion)."""

    IN_SCENE = 0
    AT_PLAYER_LOCATION = 1
    INVOLVED = 2
    HOME_AT_PLAYER_LOCATION = 3
    WORLD_HAS_SESSIONS = 4
    NO_SESSIONS = 5


#: Relevance a rule-pinned NPC gets: the best rank of the tier it is pinned to,
#: so a pin competes for capacity like the tier's most relevant natural members.
_PIN_RELEVANCE: Final[Mapping[Tier, Relevance]] = {
    Tier.DETAILED: Relevance.IN_SCENE,
    Tier.ACTIVE: Relevance.INVOLVED,
    Tier.AMBIENT: Relevance.WORLD_HAS_SESSIONS,
    Tier.DORMANT: Relevance.NO_SESSIONS,
}


def determine_simulation_tier(npc: NpcPlacement, sessions: Sequence[SessionView]) -> tuple[Tier, int]:
    """Natural tier of ``npc`` and its relevance rank (see :class:`Relevance`).

    ``sessions`` are the active sessions of the NPC's world. The best rule over
    all sessions wins: in a scene (detailed, 0), at a player's location
    (detailed, 1), involved with a player (active, 2), home at a player's
    location (active, 3), otherwise ambient (4); a world with no active
    sessions is entirely dormant (5).
    """
    if not sessions:
        return Tier.DORMANT, Relevance.NO_SESSIONS
    best = Relevance.WORLD_HAS_SESSIONS
    for session in sessions:
        if npc.id in session.scene_npc_ids:
            return Tier.DETAILED, Relevance.IN_SCENE
        if session.location is not None and npc.location == session.location:
            best = min(best, Relevance.AT_PLAYER_LOCATION)
        elif npc.id in session.involved_npc_ids:
            best = min(best, Relevance.INVOLVED)
        elif session.location is not None and npc.home == session.location:
            best = min(best, Relevance.HOME_AT_PLAYER_LOCATION)
    return _tier_of(best), best


def _tier_of(relevance: Relevance) -> Tier:
    if relevance <= Relevance.AT_PLAYER_LOCATION:
        return Tier.DETAILED
    if relevance <= Relevance.HOME_AT_PLAYER_LOCATION:
        return Tier.ACTIVE
    if relevance == Relevance.WORLD_HAS_SESSIONS:
        return Tier.AMBIENT
    return Tier.DORMANT


class _Rules(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TierMatch(_Rules):
    """Which NPCs a rule applies to: every given criterion must hold."""

    location: str | None = None
    npc_ids: frozenset[int] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> TierMatch:
        # An empty match would pin the whole world, almost surely a mistake.
        if self.location is None and self.npc_ids is None:
            raise ValueError("match needs at least one of location, npcIds")
        return self

    def matches(self, npc: NpcPlacement) -> bool:
        """Whether ``npc`` satisfies every criterion."""
        if self.location is not None and npc.location != self.location:
            return False
        return self.npc_ids is None or npc.id in self.npc_ids


class TierRule(_Rules):
    """Pins matching NPCs to at least ``tier`` before capacity is enforced.

    Configured per world as ``worlds.meta["simulation"]["tierRules"]`` (a list,
    validated by :class:`~scheduler_daemon.world_config.WorldConfig`), e.g.
    ``{"match": {"location": "market"}, "tier": "active"}``.

    A pin only raises an NPC's tier, never lowers it, and capacities still
    apply: a pinned NPC competes with the relevance of its pinned tier's best
    natural members (e.g. pinned ``detailed`` ranks like an NPC in a scene).
    """

    match: TierMatch
    tier: Literal["detailed", "active", "ambient", "dormant"]

    @property
    def min_tier(self) -> Tier:
        """The pinned tier as a :class:`Tier`."""
        return Tier.from_label(self.tier)


@dataclass(frozen=True, slots=True)
class TierAssignment:
    """Result of :func:`assign_tiers`.

    ``tiers`` maps every NPC id to its effective tier, ``counts`` has an entry
    for every :class:`Tier` including ``FROZEN``, and ``relevance`` the rank
    used for demotion (after rule pins).
    """

    tiers: dict[int, Tier]
    counts: dict[Tier, int]
    relevance: dict[int, int]

    def changed(self, previous: Mapping[int, Tier]) -> dict[int, Tier]:
        """NPCs whose tier differs from ``previous`` (unknown there counts as changed).

        NPCs only in ``previous`` are ignored: they no longer exist.
        """
        return {npc_id: tier for npc_id, tier in self.tiers.items() if previous.get(npc_id) != tier}


def _checked_capacities(capacities: Mapping[Tier, int]) -> dict[Tier, int]:
    checked: dict[Tier, int] = {}
    for tier in SIMULATED_TIERS:
        if tier not in capacities:
            raise ValueError(f"no capacity configured for tier {tier.label}")
        value = capacities[tier]
        if value < 0:
            raise ValueError(f"capacity of tier {tier.label} must be >= 0, got {value}")
        checked[tier] = value
    return checked


def assign_tiers(
    npcs: Iterable[NpcPlacement],
    sessions: Sequence[SessionView],
    capacities: Mapping[Tier, int],
    rules: Sequence[TierRule] = (),
) -> TierAssignment:
    """Assign each NPC of one world an effective tier under ``capacities``.

    ``capacities`` gives ``maxNpcs`` for each simulated tier (DETAILED to
    DORMANT; all four required). Each NPC starts at its natural tier
    (:func:`determine_simulation_tier`, raised by any matching ``rules``).
    Tiers are then filled from DETAILED down: a tier keeps its best NPCs by
    (relevance, id) up to capacity and demotes the rest to the next tier,
    where they compete with that tier's natural members (and, being more
    relevant, win). Whoever is left after DORMANT becomes ``FROZEN``.
    """
    caps = _checked_capacities(capacities)
    pools: dict[Tier, list[tuple[int, int]]] = {tier: [] for tier in SIMULATED_TIERS}
    relevance: dict[int, int] = {}
    for npc in npcs:
        if npc.id in relevance:
            raise ValueError(f"npc {npc.id} listed twice")
        tier, rank = determine_simulation_tier(npc, sessions)
        for rule in rules:
            if rule.min_tier < tier and rule.match.matches(npc):
                tier = rule.min_tier
                rank = min(rank, _PIN_RELEVANCE[tier])
        relevance[npc.id] = rank
        pools[tier].append((rank, npc.id))

    tiers: dict[int, Tier] = {}
    counts: dict[Tier, int] = dict.fromkeys(Tier, 0)
    overflow: list[tuple[int, int]] = []
    for tier in SIMULATED_TIERS:
        pool = sorted(pools[tier] + overflow)
        kept, overflow = pool[: caps[tier]], pool[caps[tier] :]
        for _, npc_id in kept:
            tiers[npc_id] = tier
        counts[tier] = len(kept)
    for _, npc_id in overflow:
        tiers[npc_id] = Tier.FROZEN
    counts[Tier.FROZEN] = len(overflow)
    return TierAssignment(tiers=tiers, counts=counts, relevance=relevance)


def select_due(candidates: Iterable[tuple[Tier, float, int]], world_time: float, budget: int) -> list[int]:
    """Pick at most ``budget`` due NPC ids from ``(tier, next_decision_at, npc_id)``.

    Only NPCs with ``next_decision_at <= world_time`` are due (``FROZEN`` never
    is). Order: higher tier first, then most overdue (smallest
    ``next_decision_at``), then id. The store mirrors this as
    ``WHERE tier < 4 AND next_decision_at <= :now
    ORDER BY tier, next_decision_at, id LIMIT :budget``.

    Why strict priority bounds lag per tier. Let ticks be ``D`` game seconds
    apart, ``N_j`` NPCs in tier ``j`` with interval ``I_j`` (a selected NPC is
    next due ``I_j`` later), ``m_j = ceil(I_j / D)`` the ticks before it can be
    due again, ``S_i = N_0 + ... + N_i`` and ``R_i = sum(N_j / m_j for j < i)``
    the per-tick demand of the tiers above ``i``. Suppose an NPC X of tier
    ``i`` is due but skipped for ``W`` consecutive ticks. Each of those ticks
    spent the whole budget ``B`` on NPCs ordered before X: a tier ``j < i`` NPC
    can be picked at most ``W / m_j + 1`` times in ``W`` ticks, and a tier
    ``i`` NPC picked ahead of X is afterwards due later than X, so at most
    ``N_i - 1`` of those. Hence ``W * B <= R_i * W + S_i - 1``; if ``R_i < B``
    then ``W <= (S_i - 1) / (B - R_i)`` and X's lag (selection time minus
    ``next_decision_at``, under ``D`` at its first due tick) is at most
    ``D * (1 + floor((S_i - 1) / (B - R_i)))``. For the top tier this is
    ``D * ceil(N_0 / B)``: one tick per budget-full of backlog. So whenever the
    due rate fits the budget, every tier's lag stays bounded.

    The bound for tier ``i`` involves no lower tier, so when the due rate
    exceeds the budget the extra lag lands in the lowest tiers first; once the
    tiers above a tier alone demand the whole budget (``R_i >= B``) that tier
    is starved and its lag grows without bound.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    due = (
        (tier, next_at, npc_id) for tier, next_at, npc_id in candidates if tier != Tier.FROZEN and next_at <= world_time
    )
    # nsmallest(n, it) == sorted(it)[:n], without sorting the whole backlog.
    return [npc_id for _, _, npc_id in heapq.nsmallest(budget, due)]


def last_taken(due: Iterable[NpcState]) -> dict[Tier, tuple[float, int]]:
    """Per tier, ``(next_decision_at, id)`` of the last NPC a selection took.

    ``due`` is in :func:`select_due` order, so the NPCs a tick left waiting in
    a tier are exactly the ones after this key in ``(next_decision_at, id)``
    order: the store's backlog probe (``Store.oldest_waiting``) starts there.
    """
    return {npc.tier: (npc.next_decision_at, npc.id) for npc in due}


def sessions_fingerprint(sessions: Iterable[SessionView]) -> str:
    """A short digest of everything tiering reads from the sessions.

    Equal fingerprints mean equal tier inputs from the sessions side, so the
    scheduler recomputes tiers only when the fingerprint changes (plus the NPC
    moves described in :func:`tier_relevant_locations`).
    """
    ordered = sorted(sessions, key=lambda s: s.id)
    if not ordered:
        # Most worlds have nobody online; discovery checks every world each pass.
        return NO_SESSIONS_FINGERPRINT
    parts = [f"{s.id}|{s.location!r}|{sorted(s.scene_npc_ids)}|{sorted(s.involved_npc_ids)}" for s in ordered]
    return _digest("\n".join(parts))


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


#: The fingerprint of a world with nobody online (most worlds, most of the time).
NO_SESSIONS_FINGERPRINT = _digest("")


def tier_relevant_locations(sessions: Iterable[SessionView], rules: Iterable[TierRule] = ()) -> frozenset[str]:
    """Locations where an NPC's arrival or departure can change its tier.

    An NPC's *location* only matters to :func:`assign_tiers` when it equals a
    session's location or a rule's ``match.location``; a move between two other
    places changes nothing, so it needs no recomputation.
    """
    places = {s.location for s in sessions if s.location is not None}
    places.update(r.match.location for r in rules if r.match.location is not None)
    return frozenset(places)
