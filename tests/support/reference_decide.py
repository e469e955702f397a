"""The decide() of before its tables were compiled, kept as the reference the compiled one must equal.

Copied from ``scheduler_daemon/simulation/behavior.py`` as it was before
``simulation/decide_tables.py``: slot by slot, activity by activity, straight
from the content models. ``tests/unit/test_decide_tables.py`` checks that both
give the same decision, bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

from scheduler_daemon.simulation.behavior import (
    COOLDOWNS_KEY,
    DAY_SECONDS,
    ENERGY_MAX,
    ENERGY_MIN,
    HOME_LOCATION,
    IDLE_ACTIVITY,
    MIN_IDLE_SECONDS,
    MOOD_MAX,
    MOOD_MIN,
    WEEK_SECONDS,
    Activity,
    BehaviorContent,
    Routine,
    Slot,
    integrate_effects,
)
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class Draws(NamedTuple):
    """The uniform draws in [0, 1) of one decision: which activity, how long, where."""

    activity: float
    duration: float
    location: float


_UNIT = 2.0**-53
_THREE_U64 = struct.Struct(">QQQ")


def decision_draws(world_id: int, npc_id: int, world_time: float) -> Draws:
    """Stable draws for one decision, from a BLAKE2b digest of its identity.

    BLAKE2b rather than :func:`hash` (whose string hashing is randomised per
    process): replaying a decision on another worker gives the same draws.
    Three 53-bit slices of one digest, instead of seeding a
    :class:`random.Random` per decision, which cost a fifth of ``decide``.
    """
    # ``+ 0.0`` folds -0.0 into 0.0 so both spell the same key.
    key = f"{world_id}:{npc_id}:{(float(world_time) + 0.0).hex()}".encode()
    a, b, c = _THREE_U64.unpack(hashlib.blake2b(key, digest_size=24, person=b"npc-decide-v2").digest())
    return Draws((a >> 11) * _UNIT, (b >> 11) * _UNIT, (c >> 11) * _UNIT)


def _pick(u: float, count: int) -> int:
    """Index in ``range(count)`` for a uniform draw ``u`` in [0, 1)."""
    return min(int(u * count), count - 1)


def _day_and_minute(world_time: float) -> tuple[int, float]:
    """Weekday index (0 = Monday) and minute after midnight of ``world_time``."""
    week_pos = world_time % WEEK_SECONDS
    if week_pos >= WEEK_SECONDS:  # a tiny negative time rounds up to a full week
        week_pos = 0.0
    day = int(week_pos // DAY_SECONDS)
    return day, (week_pos - day * DAY_SECONDS) / 60.0


def active_slot(routine: Routine, world_time: float) -> Slot | None:
    """The first slot of ``routine`` active at ``world_time``, if any."""
    day, minute = _day_and_minute(world_time)
    for slot in routine.slots:
        if slot.covers(day, minute):
            return slot
    return None


def _routine_for(npc: NpcState, content: BehaviorContent) -> Routine | None:
    # An NPC naming a routine the world no longer has falls back to the default
    # instead of freezing: content edits must not strand NPCs.
    if npc.routine is not None and npc.routine in content.routines:
        return content.routines[npc.routine]
    if content.default_routine is not None:
        return content.routines[content.default_routine]
    return None


def _read_cooldowns(state: Mapping[str, Any], content: BehaviorContent, world_time: float) -> dict[str, float]:
    """Still-running cooldowns from stored state; malformed or stale entries are dropped."""
    raw = state.get(COOLDOWNS_KEY)
    if not isinstance(raw, Mapping):
        return {}
    cooldowns: dict[str, float] = {}
    for name, finished in raw.items():
        activity = content.activities.get(name) if isinstance(name, str) else None
        if activity is None or isinstance(finished, bool):
            continue
        if not isinstance(finished, int | float) or not math.isfinite(finished):
            continue
        # A finish time in the future means world time was reset; drop it
        # rather than block the activity for an arbitrary stretch.
        if finished <= world_time < finished + activity.cooldown_seconds:
            cooldowns[name] = float(finished)
    return cooldowns


def _choose(
    slot: Slot,
    content: BehaviorContent,
    energy: float,
    cooldowns: Mapping[str, float],
    world_time: float,
    u: float,
) -> str | None:
    """Weighted pick among eligible slot activities, with the documented fallback."""
    meets: list[tuple[str, float]] = []
    eligible: list[tuple[str, float]] = []
    activities = content.activities
    for name, weight in slot.activities.items():
        activity = activities[name]
        if activity.requirements.allows(energy):
            meets.append((name, weight))
            if name not in cooldowns or world_time >= cooldowns[name] + activity.cooldown_seconds:
                eligible.append((name, weight))
    if eligible:
        # Weighted pick: the first activity whose cumulative weight exceeds u × total.
        target = u * sum(weight for _, weight in eligible)
        cumulative = 0.0
        for name, weight in eligible:
            cumulative += weight
            if target < cumulative:
                return name
        return eligible[-1][0]  # rounding left target == total
    if meets:
        # Everything is cooling down: repeat the slot's favourite rather than idle.
        return min(meets, key=lambda item: (-item[1], item[0]))[0]
    return None


def _resolve_location(activity: Activity, npc: NpcState, u: float) -> str | None:
    target = activity.location
    if target is None:
        return npc.location
    if isinstance(target, tuple):
        target = target[_pick(u, len(target))]
    if target == HOME_LOCATION:
        return npc.home if npc.home is not None else npc.location
    return target


def _finish_current(
    npc: NpcState, content: BehaviorContent, world_time: float
) -> tuple[float, float, float, dict[str, float]]:
    """Energy, mood valence and arousal after the current activity, clamped, and the running cooldowns."""
    current_name = npc.current_activity
    current = content.activities.get(current_name) if current_name is not None else None
    if npc.activity_started_at is not None:
        started = npc.activity_started_at
    elif npc.last_decision_at is not None:
        started = npc.last_decision_at
    else:
        started = world_time
    delta = integrate_effects(current, world_time - started)
    energy = _clamp(npc.energy + delta.energy, ENERGY_MIN, ENERGY_MAX)
    valence = _clamp(npc.mood_valence + delta.mood_valence, MOOD_MIN, MOOD_MAX)
    arousal = _clamp(npc.mood_arousal + delta.mood_arousal, MOOD_MIN, MOOD_MAX)
    cooldowns = _read_cooldowns(npc.state, content, world_time)
    if current is not None and current_name is not None and current.cooldown_seconds > 0.0:
        cooldowns[current_name] = world_time
    return energy, valence, arousal, cooldowns


def decide(npc: NpcState, content: BehaviorContent, world_time: float, tier_interval: float) -> NpcDecision:
    """Finish the NPC's current activity and choose the next one at ``world_time``.

    Steps: (1) integrate the current activity's effects from
    ``activity_started_at`` (else ``last_decision_at``, else no time) to
    ``world_time`` and clamp energy to [0, 100] and mood to [-100, 100];
    (2) pick the next activity from the routine slot active now, weighted,
    among activities meeting their energy requirements and off cooldown
    (fallback: the slot's highest-weight activity meeting requirements, else
    ``"idle"``); (3) move to the activity's location or stay; (4) draw a
    duration from the activity's range. The three draws (activity,
    duration, location) come from :func:`decision_draws`.

    ``next_decision_at`` is the activity's end for :attr:`Tier.DETAILED` and
    ``max(end, world_time + tier_interval)`` for coarser tiers, so a dormant
    NPC catches up analytically in one decision; it is always strictly greater
    than ``world_time``. Idling lasts ``max(tier_interval, MIN_IDLE_SECONDS)``.

    The returned ``state`` is a copy of ``npc.state`` with ``"cooldowns"``
    replaced by ``{activity: world time it last finished}`` for cooldowns
    still running; other keys are preserved.
    """
    if not math.isfinite(world_time):
        raise ValueError(f"npc {npc.id}: world_time must be finite, got {world_time}")
    if not math.isfinite(tier_interval) or tier_interval < 0.0:
        raise ValueError(f"npc {npc.id}: tier_interval must be finite and >= 0, got {tier_interval}")

    # 1. Finish the current activity.
    energy, valence, arousal, cooldowns = _finish_current(npc, content, world_time)

    # 2. Pick the next activity.
    draws = decision_draws(npc.world_id, npc.id, world_time)
    routine = _routine_for(npc, content)
    slot = active_slot(routine, world_time) if routine is not None else None
    choice = _choose(slot, content, energy, cooldowns, world_time, draws.activity) if slot is not None else None

    # 3./4. Location and duration.
    if choice is None:
        activity_name = IDLE_ACTIVITY
        duration = max(tier_interval, MIN_IDLE_SECONDS)
        location = npc.location
    else:
        activity_name = choice
        activity = content.activities[choice]
        low, high = activity.duration_minutes
        duration = (low + (high - low) * draws.duration) * 60.0
        location = _resolve_location(activity, npc, draws.location)

    end = world_time + duration
    next_at = end if npc.tier == Tier.DETAILED else max(end, world_time + tier_interval)
    if next_at <= world_time:  # huge world times can swallow a short duration
        next_at = math.nextafter(world_time, math.inf)

    new_state = dict(npc.state)
    new_state[COOLDOWNS_KEY] = cooldowns
    return NpcDecision(
        npc_id=npc.id,
        decided_at=world_time,
        next_decision_at=next_at,
        current_activity=activity_name,
        activity_started_at=world_time,
        location=location,
        energy=energy,
        mood_valence=valence,
        mood_arousal=arousal,
        state=new_state,
    )
