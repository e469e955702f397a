"""World behaviour content and the pure per-NPC decision function.

A world's behaviour lives in ``worlds.meta["behavior"]`` as JSON with camelCase
keys; :func:`parse_behavior` validates it into a :class:`BehaviorContent`.
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
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Annotated, Any, Final, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from scheduler_daemon.simulation.decide_tables import (
    ActivityEntry,
    DecideTables,
    SlotEntry,
    compile_tables,
    shared_tables,
)
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier

__all__ = [
    "COOLDOWNS_KEY",
    "DAY_SECONDS",
    "HOME_LOCATION",
    "IDLE_ACTIVITY",
    "MIN_IDLE_SECONDS",
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

DAY_SECONDS: Final = 86_400.0
WEEK_SECONDS: Final = 604_800.0
HOUR_SECONDS: Final = 3_600.0

#: Activity chosen when nothing else is possible; has no effects and no location.
IDLE_ACTIVITY: Final = "idle"
#: Lower bound on an idle stretch so a zero tier interval cannot busy-loop an NPC.
MIN_IDLE_SECONDS: Final = 60.0
#: The special location value meaning "the NPC's home".
HOME_LOCATION: Final = "home"

ENERGY_MIN: Final = 0.0
ENERGY_MAX: Final = 100.0
MOOD_MIN: Final = -100.0
MOOD_MAX: Final = 100.0

#: Key of :attr:`NpcDecision.state` holding ``{activity: world time last finished}``.
COOLDOWNS_KEY: Final = "cooldowns"

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: Final[tuple[Weekday, ...]] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
# Error type whose context carries an explicit path: cross-reference checks run
# on the whole model, where pydantic itself would only report an empty location.
_REFERENCE_ERROR: Final = "behavior_reference"

NonEmptyStr = Annotated[str, Field(min_length=1)]


class BehaviorContentError(ValueError):
    """Invalid behaviour content; the message names the world and field path(s)."""

    def __init__(self, world_id: int, problems: Iterable[str]) -> None:
        self.world_id = world_id
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(f"world {world_id}: " + f"; world {world_id}: ".join(self.problems))


class _Content(BaseModel):
    """Base for content models: camelCase JSON, strict about unknown keys."""

    # extra="forbid": a typo such as "cooldownMinute" must fail loudly rather
    # than silently fall back to a default.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )


class Requirements(_Content):
    """Energy window in which an activity may be picked (inclusive bounds)."""

    min_energy: float = Field(default=ENERGY_MIN, ge=ENERGY_MIN, le=ENERGY_MAX)
    max_energy: float = Field(default=ENERGY_MAX, ge=ENERGY_MIN, le=ENERGY_MAX)

    @model_validator(mode="after")
    def _ordered(self) -> Requirements:
        if self.min_energy > self.max_energy:
            raise ValueError(f"minEnergy {self.min_energy} > maxEnergy {self.max_energy}")
        return self

    def allows(self, energy: float) -> bool:
        """Whether an NPC with ``energy`` meets these requirements."""
        return self.min_energy <= energy <= self.max_energy


class Activity(_Content):
    """One thing an NPC can do; effects are rates per game hour."""

    duration_minutes: tuple[float, float]
    energy_per_hour: float = 0.0
    mood_valence: float = 0.0
    mood_arousal: float = 0.0
    location: NonEmptyStr | tuple[NonEmptyStr, ...] | None = None
    cooldown_minutes: float = Field(default=0.0, ge=0.0)
    requirements: Requirements = Field(default_factory=Requirements)

    @field_validator("duration_minutes")
    @classmethod
    def _valid_duration(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if low <= 0:
            raise ValueError(f"min duration must be > 0, got {low}")
        if low > high:
            raise ValueError(f"min duration {low} > max duration {high}")
        return value

    @field_validator("location")
    @classmethod
    def _non_empty_choice(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(value, tuple) and not value:
            raise ValueError("location list must not be empty")
        return value

    @property
    def cooldown_seconds(self) -> float:
        """Cooldown in game seconds."""
        return self.cooldown_minutes * 60.0


def _minute_of_day(text: str) -> int:
    match = _HHMM.match(text)
    if match is None:  # guarded by the validator; kept for direct callers
        raise ValueError(f"expected HH:MM, got {text!r}")
    return int(match.group(1)) * 60 + int(match.group(2))


class Slot(_Content):
    """A time window of a routine with weighted candidate activities."""

    days: frozenset[Weekday] = Field(default=frozenset(WEEKDAYS), min_length=1)
    start: str
    end: str
    activities: dict[NonEmptyStr, Annotated[float, Field(gt=0.0)]] = Field(min_length=1)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if _HHMM.match(value) is None:
            raise ValueError(f"expected HH:MM (00:00-23:59), got {value!r}")
        return value

    @cached_property
    def start_minute(self) -> int:
        """Start as minutes after midnight."""
        return _minute_of_day(self.start)

    @cached_property
    def end_minute(self) -> int:
        """End as minutes after midnight (``<= start_minute`` means it wraps)."""
        return _minute_of_day(self.end)

    def is_active(self, world_time: float) -> bool:
        """Whether this slot covers ``world_time``."""
        return self.covers(*_day_and_minute(world_time))

    def covers(self, day: int, minute: float) -> bool:
        """Whether this slot covers ``minute`` (after midnight) of weekday index ``day``."""
        start, end = self.start_minute, self.end_minute
        if start < end:
            return WEEKDAYS[day] in self.days and start <= minute < end
        # Wrapping (or full-day) slot: the tail after midnight belongs to the
        # previous day's entry, so "fri 22:00-02:00" covers early Saturday.
        return (WEEKDAYS[day] in self.days and minute >= start) or (WEEKDAYS[day - 1] in self.days and minute < end)


class Routine(_Content):
    """An ordered list of slots; the first active slot wins."""

    slots: list[Slot] = Field(default_factory=list)


def _reference_error(path: str, problem: str) -> PydanticCustomError:
    return PydanticCustomError(_REFERENCE_ERROR, "{path}: {problem}", {"path": path, "problem": problem})


class BehaviorContent(_Content):
    """A world's complete behaviour content."""

    activities: dict[NonEmptyStr, Activity] = Field(default_factory=dict)
    routines: dict[NonEmptyStr, Routine] = Field(default_factory=dict)
    default_routine: str | None = None

    @model_validator(mode="after")
    def _references(self) -> BehaviorContent:
        if IDLE_ACTIVITY in self.activities:
            raise _reference_error(f"activities.{IDLE_ACTIVITY}", "reserved activity name (built-in fallback)")
        for routine_name, routine in self.routines.items():
            for index, slot in enumerate(routine.slots):
                for activity in slot.activities:
                    if activity not in self.activities:
                        raise _reference_error(
                            f"routines.{routine_name}.slots.{index}.activities.{activity}",
                            "unknown activity",
                        )
        if self.default_routine is not None and self.default_routine not in self.routines:
            raise _reference_error("defaultRoutine", f"unknown routine {self.default_routine!r}")
        return self

    @cached_property
    def tables(self) -> DecideTables:
        """The lookup tables :func:`decide` reads, compiled on first use (the content never changes).

        Worlds usually share their content: equal content shares one compiled
        table (compiling costs as much as a thousand decisions).
        """
        return shared_tables(self.model_dump_json(), lambda: compile_tables(self))


def describe_validation_error(root: str, exc: ValidationError) -> list[str]:
    """Render a pydantic error as ``"root.path: message"`` lines.

    Shared with :mod:`scheduler_daemon.simulation.tiers` so all world-content
    errors read the same way.
    """
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        ctx = error.get("ctx") or {}
        if error["type"] == _REFERENCE_ERROR:
            path, message = str(ctx["path"]), str(ctx["problem"])
        else:
            path = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{root}.{path}: {message}" if path else f"{root}: {message}")
    return problems


def parse_behavior(world_id: int, raw: object) -> BehaviorContent:
    """Validate ``worlds.meta["behavior"]`` for ``world_id``.

    ``None`` (content absent) gives an empty :class:`BehaviorContent`, under
    which every NPC idles. Raises :class:`BehaviorContentError` naming the world
    and each offending field path, e.g.
    ``world 3: behavior.routines.villager.slots.0.activities.dance: unknown activity``.
    """
    if raw is None:
        return BehaviorContent()
    try:
        return BehaviorContent.model_validate(raw)
    except ValidationError as exc:
        raise BehaviorContentError(world_id, describe_validation_error("behavior", exc)) from None


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
    meets: list[tuple[str, float]] = []
    eligible: list[tuple[str, float]] = []
    for name, weight, activity in slot.candidates:
        if activity.min_energy <= energy <= activity.max_energy:
            meets.append((name, weight))
            if name not in cooldowns or world_time >= cooldowns[name] + activity.cooldown_seconds:
                eligible.append((name, weight))
    if eligible:
        # Weighted pick: the first activity whose cumulative weight exceeds u × total.
        target = u * sum([weight for _, weight in eligible])
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


def _resolve_location(target: str | tuple[str, ...] | None, npc: NpcState, u: float) -> str | None:
    if target is None:
        return npc.location
    if isinstance(target, tuple):
        target = target[_pick(u, len(target))]
    if target == HOME_LOCATION:
        return npc.home if npc.home is not None else npc.location
    return target


def _finish_current(
    npc: NpcState, activities: Mapping[str, ActivityEntry], world_time: float
) -> tuple[float, float, float, dict[str, float]]:
    """Energy, mood valence and arousal after the current activity, clamped, and the running cooldowns.

    Effects are linear in time (see :func:`integrate_effects`), clamped once at the end.
    """
    current_name = npc.current_activity
    current = activities.get(current_name) if current_name is not None else None
    if npc.activity_started_at is not None:
        started = npc.activity_started_at
    elif npc.last_decision_at is not None:
        started = npc.last_decision_at
    else:
        started = world_time
    elapsed = world_time - started
    if current is None or elapsed <= 0.0:
        d_energy = d_valence = d_arousal = 0.0
    else:
        hours = elapsed / HOUR_SECONDS
        d_energy = current.energy_per_hour * hours
        d_valence = current.mood_valence * hours
        d_arousal = current.mood_arousal * hours
    # Clamped as min(high, max(low, v)) would (ties and -0.0 give the bound), without two calls each.
    energy = npc.energy + d_energy
    if not ENERGY_MIN < energy < ENERGY_MAX:
        energy = ENERGY_MIN if energy <= ENERGY_MIN else ENERGY_MAX
    valence = npc.mood_valence + d_valence
    if not MOOD_MIN < valence < MOOD_MAX:
        valence = MOOD_MIN if valence <= MOOD_MIN else MOOD_MAX
    arousal = npc.mood_arousal + d_arousal
    if not MOOD_MIN < arousal < MOOD_MAX:
        arousal = MOOD_MIN if arousal <= MOOD_MIN else MOOD_MAX
    cooldowns = _read_cooldowns(npc.state, activities, world_time)
    if current is not None and current_name is not None and current.cooldown_seconds > 0.0:
        cooldowns[current_name] = world_time
    return energy, valence, arousal, cooldowns


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
    """:func:`decide` with its checks done and what the batch shares worked out."""
    world_time = moment.world_time
    activities = moment.activities

    # 1. Finish the current activity.
    energy, valence, arousal, cooldowns = _finish_current(npc, activities, world_time)

    # 2. Pick the next activity.
    u_activity, u_duration, u_location = _keyed_draws(f"{npc.world_id}:{npc.id}".encode() + moment.time_key)
    slot = moment.slot_for(npc.routine)
    choice = _choose(slot, energy, cooldowns, world_time, u_activity) if slot is not None else None

    # 3./4. Location and duration.
    if choice is None:
        activity_name = IDLE_ACTIVITY
        duration = max(tier_interval, MIN_IDLE_SECONDS)
        location = npc.location
    else:
        activity_name = choice
        chosen = activities[choice]
        low, high = chosen.duration_low, chosen.duration_high
        duration = (low + (high - low) * u_duration) * 60.0
        location = _resolve_location(chosen.location, npc, u_location)

    end = world_time + duration
    next_at = end if npc.tier == Tier.DETAILED else max(end, world_time + tier_interval)
    if next_at <= world_time:  # huge world times can swallow a short duration
        next_at = math.nextafter(world_time, math.inf)

    new_state = dict(npc.state)
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
