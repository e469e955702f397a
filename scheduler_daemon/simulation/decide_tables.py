"""A world's behaviour content compiled once into the lookup tables :func:`~.behavior.decide` reads.

Pure: built from a validated :class:`~.behavior.BehaviorContent` (cached on
it, so once per config version) and never changed. The tables hold exactly
what the content says, in the same order, so a decision from them is the same
decision bit for bit: which slot is active is a binary search over the
minutes where some slot starts or ends, instead of asking every slot.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

_DAY_MINUTES: Final = 24 * 60
#: Distinct contents whose compiled tables are kept for sharing (the least recently used goes).
SHARED_TABLES: Final = 256
_shared: OrderedDict[str, DecideTables] = OrderedDict()


# What compiling reads of the content models in :mod:`.behavior` (which import this module).
class _Requirements(Protocol):
    @property
    def min_energy(self) -> float: ...
    @property
    def max_energy(self) -> float: ...


class _Activity(Protocol):
    @property
    def duration_minutes(self) -> tuple[float, float]: ...
    @property
    def energy_per_hour(self) -> float: ...
    @property
    def mood_valence(self) -> float: ...
    @property
    def mood_arousal(self) -> float: ...
    @property
    def location(self) -> str | tuple[str, ...] | None: ...
    @property
    def cooldown_seconds(self) -> float: ...
    @property
    def requirements(self) -> _Requirements: ...


class _Slot(Protocol):
    @property
    def start_minute(self) -> int: ...
    @property
    def end_minute(self) -> int: ...
    @property
    def activities(self) -> Mapping[str, float]: ...
    def covers(self, day: int, minute: float) -> bool: ...


class _Routine(Protocol):
    @property
    def slots(self) -> Sequence[_Slot]: ...


class _Content(Protocol):
    @property
    def activities(self) -> Mapping[str, _Activity]: ...
    @property
    def routines(self) -> Mapping[str, _Routine]: ...
    @property
    def default_routine(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ActivityEntry:
    """One activity's numbers, as :func:`~.behavior.decide` uses them."""

    energy_per_hour: float
    mood_valence: float
    mood_arousal: float
    location: str | tuple[str, ...] | None
    cooldown_seconds: float
    duration_low: float
    duration_high: float
    min_energy: float
    max_energy: float


@dataclass(frozen=True, slots=True)
class SlotEntry:
    """A routine slot's candidates in the content's order: ``(name, weight, activity)``."""

    candidates: tuple[tuple[str, float, ActivityEntry], ...]


@dataclass(frozen=True, slots=True)
class RoutineTable:
    """Per weekday, the minutes where the active slot changes and the slot from each on (``None``: no slot)."""

    bounds: tuple[tuple[int, ...], ...]
    slots: tuple[tuple[SlotEntry | None, ...], ...]

    def slot_at(self, day: int, minute: float) -> SlotEntry | None:
        """The slot active at ``minute`` after midnight of weekday ``day`` (first listed wins), if any."""
        return self.slots[day][bisect_right(self.bounds[day], minute) - 1]


@dataclass(frozen=True, slots=True)
class DecideTables:
    """Everything :func:`~.behavior.decide` looks up, by name."""

    activities: Mapping[str, ActivityEntry]
    routines: Mapping[str, RoutineTable]
    default_routine: RoutineTable | None

    def routine_for(self, name: str | None) -> RoutineTable | None:
        """The NPC's routine, else the default one (an unknown name must not strand an NPC), else ``None``."""
        if name is not None:
            table = self.routines.get(name)
            if table is not None:
                return table
        return self.default_routine


def _activity_entry(activity: _Activity) -> ActivityEntry:
    low, high = activity.duration_minutes
    return ActivityEntry(
        energy_per_hour=activity.energy_per_hour,
        mood_valence=activity.mood_valence,
        mood_arousal=activity.mood_arousal,
        location=activity.location,
        cooldown_seconds=activity.cooldown_seconds,
        duration_low=low,
        duration_high=high,
        min_energy=activity.requirements.min_energy,
        max_energy=activity.requirements.max_energy,
    )


def _routine_table(routine: _Routine, entries: Sequence[SlotEntry]) -> RoutineTable:
    bounds: list[tuple[int, ...]] = []
    slots: list[tuple[SlotEntry | None, ...]] = []
    # Slots start and end on whole minutes: between two consecutive such minutes
    # the same slots cover every instant, so one look per stretch suffices.
    edges = sorted({0, *(s.start_minute for s in routine.slots), *(s.end_minute for s in routine.slots)})
    edges = [e for e in edges if e < _DAY_MINUTES]
    for day in range(7):
        day_bounds: list[int] = []
        day_slots: list[SlotEntry | None] = []
        for edge in edges:
            active = next(
                (entry for slot, entry in zip(routine.slots, entries, strict=True) if _covers(slot, day, edge)), None
            )
            if day_slots and day_slots[-1] is active:
                continue
            day_bounds.append(edge)
            day_slots.append(active)
        bounds.append(tuple(day_bounds))
        slots.append(tuple(day_slots))
    return RoutineTable(tuple(bounds), tuple(slots))


def _covers(slot: _Slot, day: int, minute: int) -> bool:
    return slot.covers(day, float(minute))


def compile_tables(content: _Content) -> DecideTables:
    """The lookup tables of ``content`` (validated: every slot's activities exist)."""
    activities = {name: _activity_entry(activity) for name, activity in content.activities.items()}
    routines: dict[str, RoutineTable] = {}
    for name, routine in content.routines.items():
        entries = [
            SlotEntry(tuple((activity, weight, activities[activity]) for activity, weight in slot.activities.items()))
            for slot in routine.slots
        ]
        routines[name] = _routine_table(routine, entries)
    default = routines[content.default_routine] if content.default_routine is not None else None
    return DecideTables(activities, routines, default)


def shared_tables(key: str, compile_: Callable[[], DecideTables]) -> DecideTables:
    """The tables compiled for content ``key`` (its canonical JSON): reused, else ``compile_()`` and kept."""
    tables = _shared.get(key)
    if tables is None:
        tables = _shared[key] = compile_()
        if len(_shared) > SHARED_TABLES:
            _shared.popitem(last=False)
    else:
        _shared.move_to_end(key)
    return tables
