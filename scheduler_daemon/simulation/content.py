"""World behaviour content: what ``worlds.meta["behavior"]`` may say, validated.

A world's behaviour lives in ``worlds.meta["behavior"]`` as JSON with camelCase
keys; :func:`parse_behavior` validates it into a :class:`BehaviorContent`,
which :func:`~scheduler_daemon.simulation.behavior.decide` reads (through its
compiled tables). Pure: no I/O.

World time is a float of game seconds since the world's epoch; 0 is Monday
00:00, a day is 86 400 s and a week 604 800 s. Content semantics (a slot's
days and wrapping, ``"home"``, the reserved ``"idle"``) are described in
:mod:`scheduler_daemon.simulation.behavior`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from typing import Annotated, Final, Literal

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

from scheduler_daemon.simulation.decide_tables import DecideTables, compile_tables, shared_tables

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
