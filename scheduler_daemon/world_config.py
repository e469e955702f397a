"""The per-world scheduler config stored in ``worlds.meta["simulation"]``.

One pydantic model is the single source of truth: the HTTP API, the CLI, the
database loader and the defaults all go through :func:`parse_world_config`.
Keys are camelCase on the wire; unknown keys are kept (``extra="allow"``) so a
newer client's fields survive a round trip through an older daemon.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, Tier
from scheduler_daemon.simulation.tiers import TierRule


class ConfigModel(BaseModel):
    """Base for config models: camelCase aliases, unknown keys kept, no NaN/inf."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        allow_inf_nan=False,
        validate_assignment=True,
    )


class TierConfig(ConfigModel):
    """Capacity and decision cadence of one simulation tier."""

    max_npcs: int = Field(ge=0, le=10_000_000)
    decision_interval_seconds: float = Field(gt=0, le=365 * 86400)
    description: str | None = None


class TiersConfig(ConfigModel):
    """The four simulated tiers, highest priority first."""

    detailed: TierConfig = TierConfig(max_npcs=20, decision_interval_seconds=60, description="Near player")
    active: TierConfig = TierConfig(max_npcs=100, decision_interval_seconds=300, description="Current session")
    ambient: TierConfig = TierConfig(max_npcs=500, decision_interval_seconds=1800, description="Same world")
    dormant: TierConfig = TierConfig(max_npcs=5000, decision_interval_seconds=7200, description="Inactive")

    def for_tier(self, tier: Tier) -> TierConfig:
        """Config of a simulated tier (``FROZEN`` has none)."""
        cfg: TierConfig = getattr(self, tier.label)
        return cfg

    def capacities(self) -> dict[Tier, int]:
        return {t: self.for_tier(t).max_npcs for t in SIMULATED_TIERS}

    def intervals(self) -> dict[Tier, float]:
        return {t: self.for_tier(t).decision_interval_seconds for t in SIMULATED_TIERS}


class GenerationConfig(ConfigModel):
    """Quotas for handing generation requests to workers (backpressure)."""

    max_in_flight_per_world: int = Field(default=20, ge=0, le=1_000_000)
    max_in_flight_per_user: int = Field(default=5, ge=0, le=1_000_000)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    retry_backoff_seconds: float = Field(default=5.0, ge=0, le=86400)


class WorldConfig(ConfigModel):
    """Effective scheduler config of one world (``worlds.meta["simulation"]``)."""

    time_scale: float = Field(default=60.0, gt=0, le=1_000_000)
    tick_interval_seconds: float = Field(default=1.0, ge=0.01, le=3600)
    max_npc_ticks_per_step: int = Field(default=50, ge=0, le=1_000_000)
    max_job_ops_per_step: int = Field(default=10, ge=0, le=1_000_000)
    #: Interaction-chain steps fired per tick at most (the rest fire next tick, in order).
    max_chain_steps_per_step: int = Field(default=100, ge=0, le=1_000_000)
    pause_simulation: bool = False
    max_catch_up_seconds: float = Field(default=60.0, gt=0, le=86400)
    #: Strict: discovery reads it in SQL as a JSON boolean, so ``1`` or ``"yes"``
    #: (which a lax bool would accept) must isolate the world, not run it.
    always_on: StrictBool = False
    tiers: TiersConfig = TiersConfig()
    #: Rule-based tier pins (see :class:`~scheduler_daemon.simulation.tiers.TierRule`);
    #: strict: an unknown key inside a rule is an error, not kept.
    tier_rules: list[TierRule] = Field(default_factory=list)
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _catch_up_covers_interval(self) -> WorldConfig:
        # A cap below the interval would make every tick lose time: the world
        # would silently run slower than its timeScale.
        if self.max_catch_up_seconds < self.tick_interval_seconds:
            raise ValueError(
                "maxCatchUpSeconds must be at least tickIntervalSeconds "
                f"({self.max_catch_up_seconds} < {self.tick_interval_seconds})"
            )
        return self

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON-ready dict, unknown keys included."""
        return self.model_dump(mode="json", by_alias=True)


#: The built-in defaults (the seed's) as a camelCase dict.
BUILTIN_DEFAULTS: dict[str, Any] = WorldConfig().to_wire()


class WorldConfigError(ValueError):
    """A world's stored or submitted config is invalid; the message names world and field."""

    def __init__(self, world_id: int | None, errors: list[tuple[str, str]]) -> None:
        self.world_id = world_id
        self.errors = errors
        where = f"world {world_id}: " if world_id is not None else ""
        detail = "; ".join(f"simulation.{loc}: {msg}" if loc else f"simulation: {msg}" for loc, msg in errors)
        super().__init__(f"{where}invalid scheduler config: {detail}")


def _loc(err_loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in err_loc)


def errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) pairs of a validation error."""
    return [(_loc(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``patch`` into a copy of ``base`` (JSON merge patch, RFC 7396).

    Nested objects merge key by key (so ``{"tiers": {"detailed": {"maxNpcs": 5}}}``
    keeps the other tiers and the detailed tier's other fields); ``null``
    removes a key so it falls back to its default.
    """
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _reject_non_finite(value: Any, path: str = "") -> list[tuple[str, str]]:
    # allow_inf_nan only guards float fields; NaN hidden in an unknown key
    # would still poison JSON output, so refuse it everywhere.
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, "value must be a finite number")]
    if isinstance(value, Mapping):
        return [e for k, v in value.items() for e in _reject_non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _reject_non_finite(v, f"{path}.{i}")]
    return []


def parse_world_config(
    raw: object, *, world_id: int | None = None, defaults: Mapping[str, Any] | None = None
) -> WorldConfig:
    """Validate a raw ``simulation`` object, merged over ``defaults``.

    Raises :class:`WorldConfigError` naming the world and every failing field.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise WorldConfigError(world_id, [("", f"expected an object, got {type(raw).__name__}")])
    # Merge over the built-in defaults too, so a partial tier ({"maxNpcs": 5})
    # keeps that tier's other fields instead of failing as "field required".
    merged = merge_patch(merge_patch(BUILTIN_DEFAULTS, defaults or {}), raw)
    bad = _reject_non_finite(merged)
    if bad:
        raise WorldConfigError(world_id, bad)
    try:
        return WorldConfig.model_validate(merged)
    except ValidationError as exc:
        raise WorldConfigError(world_id, errors_of(exc)) from None


def apply_patch(
    current_raw: Mapping[str, Any] | None,
    patch: object,
    *,
    world_id: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], WorldConfig]:
    """Merge a partial update into a world's stored config and validate the result.

    Returns the new raw dict to store and the validated effective config.
    """
    if not isinstance(patch, Mapping):
        raise WorldConfigError(world_id, [("", f"expected an object, got {type(patch).__name__}")])
    new_raw = merge_patch(current_raw or {}, patch)
    return new_raw, parse_world_config(new_raw, world_id=world_id, defaults=defaults)
