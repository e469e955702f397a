"""Interaction chains and cooldowns on world time. Pure.

A chain is a list of steps, each waiting a game-time duration after the
previous one (the first after the chain started). Step ``i`` is due at
``started_at + wait_0 + … + wait_i``: due times are computed from the
schedule, not from when the previous step happened to fire, so a late tick
never makes a chain drift. A tick fires every due step, in order, never
skipping one (bounded per tick; the rest fire on the next tick).

Cooldowns compare world times only (``lastInteractionAt`` is a world time),
never the wall clock: a paused world's cooldowns are paused too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ACTIVE = "active"
COMPLETED = "completed"
CANCELLED = "cancelled"
FAILED = "failed"
STATUSES = (ACTIVE, COMPLETED, CANCELLED, FAILED)

MAX_STEPS = 1000
MAX_KEY_LENGTH = 200
MAX_STEP_PAYLOAD_BYTES = 64 * 1024
#: Longest single wait (a game century): keeps due times finite and sane.
MAX_WAIT_SECONDS = 100 * 365 * 86400.0


class ChainError(ValueError):
    """A chain definition (or a stored chain row) is invalid; the message names the field."""


def wait_seconds(seconds: float) -> float:
    """A wait of ``seconds`` game seconds (finite, not negative)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ChainError(f"wait: expected a number of game seconds, got {seconds!r}")
    value = float(seconds)
    if not math.isfinite(value) or value < 0:
        raise ChainError(f"wait: must be a finite number >= 0, got {seconds!r}")
    if value > MAX_WAIT_SECONDS:
        raise ChainError(f"wait: longer than {MAX_WAIT_SECONDS:g} game seconds")
    return value


def wait_minutes(minutes: float) -> float:
    """A wait of ``minutes`` game minutes, in game seconds."""
    return wait_seconds(_number(minutes, "minutes") * 60.0)


def wait_hours(hours: float) -> float:
    """A wait of ``hours`` game hours, in game seconds."""
    return wait_seconds(_number(hours, "hours") * 3600.0)


def wait_days(days: float) -> float:
    """A wait of ``days`` game days, in game seconds."""
    return wait_seconds(_number(days, "days") * 86400.0)


def _number(value: object, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ChainError(f"wait: expected a number of game {unit}, got {value!r}")
    if value < 0 or not math.isfinite(value):
        raise ChainError(f"wait: must be a finite number >= 0, got {value!r} {unit}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One step: fire ``wait`` game seconds after the previous one, with an optional payload."""

    wait: float
    payload: Any = None

    def to_wire(self) -> dict[str, Any]:
        return {"wait": self.wait, "payload": self.payload}


def step(wait: float, payload: Any = None) -> ChainStep:
    """Build a validated step, e.g. ``step(wait_hours(1), {"line": "Back so soon?"})``."""
    return _parse_step({"wait": wait, "payload": payload}, 0)


def _parse_step(raw: object, index: int) -> ChainStep:
    where = f"steps[{index}]"
    if isinstance(raw, ChainStep):
        raw = raw.to_wire()
    if not isinstance(raw, Mapping):
        raise ChainError(f"{where}: expected an object with 'wait', got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in ("wait", "payload"))
    if unknown:
        raise ChainError(f"{where}: unknown keys {', '.join(unknown)} (expected 'wait' and optional 'payload')")
    if "wait" not in raw:
        raise ChainError(f"{where}.wait: missing")
    try:
        wait = wait_seconds(raw["wait"])
    except ChainError as exc:
        raise ChainError(f"{where}.{exc}") from None
    payload = raw.get("payload")
    try:
        encoded = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ChainError(f"{where}.payload: not JSON-serialisable: {exc}") from None
    if len(encoded.encode()) > MAX_STEP_PAYLOAD_BYTES:
        raise ChainError(f"{where}.payload: larger than {MAX_STEP_PAYLOAD_BYTES} bytes encoded")
    return ChainStep(wait, json.loads(encoded))


def parse_steps(raw: object) -> list[ChainStep]:
    """Validate a step list (``ChainStep`` values or ``{"wait": s, "payload": …}`` objects)."""
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise ChainError(f"steps: expected a list of steps, got {type(raw).__name__}")
    if not raw:
        raise ChainError("steps: a chain needs at least one step")
    if len(raw) > MAX_STEPS:
        raise ChainError(f"steps: at most {MAX_STEPS} steps, got {len(raw)}")
    return [_parse_step(s, i) for i, s in enumerate(raw)]


def steps_to_wire(steps: Sequence[ChainStep]) -> list[dict[str, Any]]:
    """JSON form stored in ``interaction_chains.steps``."""
    return [s.to_wire() for s in steps]


def validate_key(key: object, what: str = "chain_key") -> str:
    """A non-empty identifier of at most :data:`MAX_KEY_LENGTH` characters."""
    if not isinstance(key, str) or not key.strip():
        raise ChainError(f"{what}: expected a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise ChainError(f"{what}: longer than {MAX_KEY_LENGTH} characters")
    return key


def first_due_at(started_at: float, steps: Sequence[ChainStep]) -> float:
    """World time the first step fires."""
    return started_at + steps[0].wait


@dataclass(frozen=True, slots=True)
class FiredStep:
    """A step that fired: its index, the world time it was due and the one it fired at."""

    index: int
    due_at: float
    fired_at: float
    payload: Any

    def to_wire(self) -> dict[str, Any]:
        return {"step": self.index, "dueAt": self.due_at, "firedAt": self.fired_at}


@dataclass(frozen=True, slots=True)
class ChainAdvance:
    """The result of advancing one chain in one tick."""

    chain_id: int
    fired: list[FiredStep] = field(default_factory=list)
    current_step: int = 0
    next_step_at: float | None = None
    completed: bool = False


def advance_chain(
    chain_id: int,
    steps: Sequence[ChainStep],
    current_step: int,
    next_step_at: float,
    world_time: float,
    budget: int,
) -> ChainAdvance:
    """Fire every step due by ``world_time``, in order, at most ``budget`` of them.

    ``current_step`` is the index of the next step to fire and
    ``next_step_at`` its due time. Raises :class:`ChainError` if they do not
    fit ``steps`` (a broken stored row).
    """
    if not 0 <= current_step < len(steps):
        raise ChainError(f"current_step: {current_step} is outside the {len(steps)} steps of the chain")
    if not math.isfinite(next_step_at):
        raise ChainError(f"next_step_at: not a finite world time ({next_step_at!r})")
    fired: list[FiredStep] = []
    index, due = current_step, next_step_at
    while index < len(steps) and due <= world_time and len(fired) < budget:
        fired.append(FiredStep(index, due, world_time, steps[index].payload))
        index += 1
        if index < len(steps):
            due += steps[index].wait
    completed = index >= len(steps)
    return ChainAdvance(chain_id, fired, index, None if completed else due, completed)


def on_cooldown(last_interaction_at: float | None, cooldown_seconds: float, world_time: float) -> bool:
    """Whether an interaction last done at ``last_interaction_at`` is still cooling down (all world time)."""
    if cooldown_seconds < 0 or not math.isfinite(cooldown_seconds):
        raise ChainError(f"cooldown: must be a finite number of game seconds >= 0, got {cooldown_seconds!r}")
    if last_interaction_at is None:
        return False
    return world_time < last_interaction_at + cooldown_seconds
