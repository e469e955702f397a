"""The pure per-NPC decision function, over a world's behaviour content.

A world's behaviour lives in ``worlds.meta["behavior"]`` as JSON with camelCase
keys; :func:`parse_behavior` (:mod:`~scheduler_daemon.simulation.content`,
re-exported here) validates it into a :class:`BehaviorContent`.
:func:`decide` turns one :class:`NpcState` plus that content into one
:class:`NpcDecision`. Everything here is pure and deterministic: no I/O, no
wall clock and no global random state, so a decision can be replayed exactly.

World time is a float of game seconds since the world's epoch; 0 is Monday
00:00, a day is 86 400 s and a week 604 800 s.

Content semantics worth knowing:

* Absent content (``None``) is valid and yields an empty :class:`BehaviorContent`
  under which every NPC idles: :func:`decide` returns the :data:`IDLE_ACTIVITY`
  with no effects and the next decision one tier interval later.
* A routine slot is active from ``start`` (inclusive) to ``end`` (exclusive)
  on each of its ``days``. If ``end <= start`` the slot wraps past midnight and
  the part after midnight belongs to the *start* day (``fri 22:00-02:00`` covers
  Saturday 00:00-02:00); ``start == end`` means a full 24 hours. When several
  slots are active the first one listed wins.
* An activity's ``location`` may be a single place, a list of places (one is
  drawn with the decision's location draw), ``"home"`` (the NPC's home) or absent (stay).
* The activity name ``"idle"`` is reserved for the built-in fallback.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

from scheduler_daemon.simulation.content import (
    COOLDOWNS_KEY,
    DAY_SECONDS,
    ENERGY_MAX,
    ENERGY_MIN,
    HOME_LOCATION,
    HOUR_SECONDS,
    IDLE_ACTIVITY,
    MIN_IDLE_SECONDS,
    MOOD_MAX,
    MOOD_MIN,
    WEEK_SECONDS,
    WEEKDAYS,
    Activity,
    BehaviorContent,
    BehaviorContentError,
    Requirements,
    Routine,
    Slot,
    _day_and_minute,
    active_slot,
    describe_validation_error,
    parse_behavior,
)
from scheduler_daemon.simulation.decide_tables import ActivityEntry, DecideTables, SlotEntry
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier

__all__ = [
    "COOLDOWNS_KEY",
    "DAY_SECONDS",
    "HOME_LOCATION",
    "IDLE_ACTIVITY",
    "MIN_IDLE_SECONDS",
    "WEEKDAYS",
    "WEEK_SECONDS",
    "Activity",
    "BehaviorContent",
    "BehaviorContentError",
    "DecideFn",
    "Draws",
    "EffectDelta",
    "Requirements",
    "Routine",
    "Slot",
    "active_slot",
    "decide",
    "decision_draws",
    "describe_validation_error",
    "integrate_effects",
    "parse_behavior",
    "simulate_batch",
]


class EffectDelta(NamedTuple):
    """Unclamped change of an NPC's energy and mood."""

    energy: float
    mood_valence: float
    mood_arousal: float


def integrate_effects(activity: Activity | None, elapsed_seconds: float) -> EffectDelta:
    """Effect of doing ``activity`` for ``elapsed_seconds`` game seconds, unclamped.

    Rates are constant per hour, so the integral is linear in time: one 8-hour
    stretch equals eight 1-hour stretches. Clamping is applied by the caller
    afterwards, which is the only place the two can differ. ``None`` (idle or
    an activity unknown to the content) has no effect; negative elapsed time
    counts as zero.
    """
    if activity is None or elapsed_seconds <= 0.0:
        return EffectDelta(0.0, 0.0, 0.0)
    hours = elapsed_seconds / HOUR_SECONDS
    return EffectDelta(
        activity.energy_per_hour * hours,
        activity.mood_valence * hours,
        activity.mood_arousal * hours,
    )


class Draws(NamedTuple):
    """The uniform draws in [0, 1) of one decision: which activity, how long, where."""

    activity: float
    duration: float
    location: float


_UNIT = 2.0**-53
_THREE_U64 = struct.Struct(">QQQ")
# Copying a keyed, personalised hasher is cheaper than building one per decision.
_DRAW_HASH: Final = hashlib.blake2b(digest_size=24, person=b"npc-decide-v2")
_DETAILED: Final = Tier.DETAILED  # a module constant is cheaper to read than the enum's attribute


def decision_draws(world_id: int, npc_id: int, world_time: float) -> Draws:
    """Stable draws for one decision, from a BLAKE2b digest of its identity.

    BLAKE2b rather than :func:`hash` (whose string hashing is randomised per
    process): replaying a decision on another worker gives the same draws.
    Three 53-bit slices of one digest, instead of seeding a
    :class:`random.Random` per decision, which cost a fifth of ``decide``.
    """
    return Draws(*_draws(world_id, npc_id, world_time))


def _draws(world_id: int, npc_id: int, world_time: float) -> tuple[float, float, float]:
    return _keyed_draws(f"{world_id}:{npc_id}".encode() + _time_key(world_time))


def _time_key(world_time: float) -> bytes:
    # ``+ 0.0`` folds -0.0 into 0.0 so both spell the same key.
    return b":" + (float(world_time) + 0.0).hex().encode()


def _keyed_draws(key: bytes) -> tuple[float, float, float]:
    hasher = _DRAW_HASH.copy()
    hasher.update(key)
    a, b, c = _THREE_U64.unpack(hasher.digest())
    return (a >> 11) * _UNIT, (b >> 11) * _UNIT, (c >> 11) * _UNIT


def _pick(u: float, count: int) -> int:
    """Index in ``range(count)`` for a uniform draw ``u`` in [0, 1)."""
    return min(int(u * count), count - 1)


def _read_cooldowns(
    state: Mapping[str, Any], activities: Mapping[str, ActivityEntry], world_time: float
) -> dict[str, float]:
    """Still-running cooldowns from stored state; malformed or stale entries are dropped."""
    raw = state.get(COOLDOWNS_KEY)
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return {}
    cooldowns: dict[str, float] = {}
    for name, finished in raw.items():
        activity = activities.get(name) if isinstance(name, str) else None
        if activity is None:
            continue
        if type(finished) is not float:
            if isinstance(finished, bool) or not isinstance(finished, int | float):
                continue
            finished = float(finished)
        if not math.isfinite(finished):
            continue
        # A finish time in the future means world time was reset; drop it
        # rather than block the activity for an arbitrary stretch.
        if finished <= world_time < finished + activity.cooldown_seconds:
            cooldowns[name] = finished
    return cooldowns


def _choose(slot: SlotEntry, energy: float, cooldowns: Mapping[str, float], world_time: float, u: float) -> str | None:
    """Weighted pick among eligible slot activities, with the documented fallback."""
    eligible: list[tuple[str, float]] = []
    meets_energy = False
    for name, weight, activity in slot.candidates:
        if activity.min_energy <= energy <= activity.max_energy:
            meets_energy = True
            if name not in cooldowns or world_time >= cooldowns[name] + activity.cooldown_seconds:
                eligible.append((name, weight))
    if eligible:
        if len(eligible) == 1:  # what the weighted pick gives too, whatever the draw
            return eligible[0][0]
        # Weighted pick: the first activity whose cumulative weight exceeds u × total.
        target = u * sum([weight for _, weight in eligible])
        cumulative = 0.0
        for name, weight in eligible:
            cumulative += weight
            if target < cumulative:
                return name
        return eligible[-1][0]  # rounding left target == total
    if meets_energy:
        # Everything is cooling down: repeat the slot's favourite rather than idle.
        meets = [(n, w) for n, w, a in slot.candidates if a.min_energy <= energy <= a.max_energy]
        return min(meets, key=lambda item: (-item[1], item[0]))[0]
    return None


class _Moment:
    """What every decision of one world at one world time shares, worked out once per batch."""

    __slots__ = ("activities", "day", "minute", "slots", "tables", "time_key", "world_time")

    def __init__(self, tables: DecideTables, world_time: float) -> None:
        self.tables = tables
        self.activities = tables.activities
        self.world_time = world_time
        self.time_key = _time_key(world_time)
        self.day, self.minute = _day_and_minute(world_time)
        self.slots: dict[str | None, SlotEntry | None] = {}

    def slot_for(self, routine_name: str | None) -> SlotEntry | None:
        """The slot active now in the named routine (see :meth:`DecideTables.routine_for`)."""
        try:
            return self.slots[routine_name]
        except KeyError:
            routine = self.tables.routine_for(routine_name)
            slot = routine.slot_at(self.day, self.minute) if routine is not None else None
            self.slots[routine_name] = slot
            return slot


def _check_world_time(npc: NpcState, world_time: float) -> None:
    if not math.isfinite(world_time):
        raise ValueError(f"npc {npc.id}: world_time must be finite, got {world_time}")


def _check_interval(npc: NpcState, tier_interval: float) -> None:
    if not math.isfinite(tier_interval) or tier_interval < 0.0:
        raise ValueError(f"npc {npc.id}: tier_interval must be finite and >= 0, got {tier_interval}")


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
    still running; other keys are preserved. The content's routines and
    activities are read from its compiled :attr:`BehaviorContent.tables`.
    """
    _check_world_time(npc, world_time)
    _check_interval(npc, tier_interval)
    return _decide(npc, _Moment(content.tables, world_time), tier_interval)


def _decide(npc: NpcState, moment: _Moment, tier_interval: float) -> NpcDecision:
    """:func:`decide` with its checks done and what the batch shares worked out.

    Runs once per NPC per tick: the steps are written out inline (each helper
    call cost about as much as its arithmetic), except the draws, which must
    stay exactly those of :func:`decision_draws`.
    """
    world_time = moment.world_time
    activities = moment.activities

    # 1. Finish the current activity: effects linear in time, clamped once at the end
    # (as min(high, max(low, v)) would: ties and -0.0 give the bound), without two calls each.
    current_name = npc.current_activity
    current = activities.get(current_name) if current_name is not None else None
    started = npc.activity_started_at
    if started is None:
        started = npc.last_decision_at
        if started is None:
            started = world_time
    elapsed = world_time - started
    if current is None or elapsed <= 0.0:
        d_energy = d_valence = d_arousal = 0.0
    else:
        hours = elapsed / HOUR_SECONDS
        d_energy = current.energy_per_hour * hours
        d_valence = current.mood_valence * hours
        d_arousal = current.mood_arousal * hours
    energy = npc.energy + d_energy
    if not ENERGY_MIN < energy < ENERGY_MAX:
        energy = ENERGY_MIN if energy <= ENERGY_MIN else ENERGY_MAX
    valence = npc.mood_valence + d_valence
    if not MOOD_MIN < valence < MOOD_MAX:
        valence = MOOD_MIN if valence <= MOOD_MIN else MOOD_MAX
    arousal = npc.mood_arousal + d_arousal
    if not MOOD_MIN < arousal < MOOD_MAX:
        arousal = MOOD_MIN if arousal <= MOOD_MIN else MOOD_MAX
    state = npc.state
    raw = state.get(COOLDOWNS_KEY)
    # Most NPCs have no cooldown running: an empty dict needs no reading.
    cooldowns = {} if type(raw) is dict and not raw else _read_cooldowns(state, activities, world_time)
    if current is not None and current.cooldown_seconds > 0.0:
        cooldowns[current_name] = world_time  # type: ignore[index]  # current is not None: neither is its name

    # 2. Pick the next activity.
    u_activity, u_duration, u_location = _keyed_draws(f"{npc.world_id}:{npc.id}".encode() + moment.time_key)
    slot = moment.slot_for(npc.routine)
    choice = _choose(slot, energy, cooldowns, world_time, u_activity) if slot is not None else None

    # 3./4. Location and duration.
    if choice is None:
        activity_name = IDLE_ACTIVITY
        duration = MIN_IDLE_SECONDS if tier_interval < MIN_IDLE_SECONDS else tier_interval  # max(), inline
        location = npc.location
    else:
        activity_name = choice
        chosen = activities[choice]
        low, high = chosen.duration_low, chosen.duration_high
        duration = (low + (high - low) * u_duration) * 60.0
        target = chosen.location
        if target is None:
            location = npc.location
        else:
            if isinstance(target, tuple):
                target = target[_pick(u_location, len(target))]
            location = target if target != HOME_LOCATION else npc.home if npc.home is not None else npc.location

    end = world_time + duration
    floor = end if npc.tier == _DETAILED else world_time + tier_interval
    next_at = floor if floor > end else end  # max(end, floor), inline
    if next_at <= world_time:  # huge world times can swallow a short duration
        next_at = math.nextafter(world_time, math.inf)

    new_state = dict(state)
    new_state[COOLDOWNS_KEY] = cooldowns
    return NpcDecision(
        npc.id, world_time, next_at, activity_name, world_time, location, energy, valence, arousal, new_state
    )


DecideFn = Callable[[NpcState, BehaviorContent, float, float], NpcDecision]


def simulate_batch(
    npcs: Iterable[NpcState],
    content: BehaviorContent,
    world_time: float,
    tier_intervals: Mapping[Tier, float],
    decide_fn: DecideFn = decide,
) -> list[NpcDecision]:
    """Decide for each NPC of one world at ``world_time``, in input order.

    Each NPC uses its own tier's interval. Because ``decide_fn`` may be a
    plug-in, its results are checked: a decision for another NPC, or one whose
    ``next_decision_at`` is not after ``world_time`` (which would make the NPC
    due again every tick), raises :class:`ValueError`.
    """
    if decide_fn is decide:
        return _decide_all(npcs, content, world_time, tier_intervals)
    decisions: list[NpcDecision] = []
    for npc in npcs:
        interval = tier_intervals.get(npc.tier)
        if interval is None:
            raise ValueError(f"npc {npc.id}: no interval configured for tier {npc.tier.label}")
        decision = decide_fn(npc, content, world_time, interval)
        if decision.npc_id != npc.id:
            raise ValueError(f"npc {npc.id}: decide function returned a decision for npc {decision.npc_id}")
        if not decision.next_decision_at > world_time:
            raise ValueError(
                f"npc {npc.id}: next_decision_at {decision.next_decision_at} is not after world time {world_time}"
            )
        decisions.append(decision)
    return decisions


def _decide_all(
    npcs: Iterable[NpcState], content: BehaviorContent, world_time: float, tier_intervals: Mapping[Tier, float]
) -> list[NpcDecision]:
    """:func:`simulate_batch` with the built-in :func:`decide`: the same decisions and errors, checked once.

    Its decisions need no checking (each is for its NPC and after ``world_time``).
    """
    moment: _Moment | None = None
    checked: dict[Tier, float] = {}
    decisions: list[NpcDecision] = []
    for npc in npcs:
        if moment is None:
            _check_world_time(npc, world_time)
            moment = _Moment(content.tables, world_time)
        interval = checked.get(npc.tier)
        if interval is None:
            interval = tier_intervals.get(npc.tier)
            if interval is None:
                raise ValueError(f"npc {npc.id}: no interval configured for tier {npc.tier.label}")
            _check_interval(npc, interval)
            checked[npc.tier] = interval
        decisions.append(_decide(npc, moment, interval))
    return decisions
