"""The admin API's wire format: pydantic models (camelCase JSON) and encoding helpers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from scheduler_daemon.admin import WorldPage
from scheduler_daemon.loop_budget import LoopBudget
from scheduler_daemon.scheduler import TickResult

#: ``GET /api/v1/worlds`` page sizes: the default and the largest a client may ask for.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

MAX_WORLD_ID = 2**31 - 1
MAX_REQUEST_ID = 2**63 - 1

WorldId = Annotated[int, PathParam(ge=1, le=MAX_WORLD_ID, description="World id")]
RequestId = Annotated[int, PathParam(ge=1, le=MAX_REQUEST_ID)]


_QUARANTINED_NPCS_DEPRECATED = (
    "Deprecated: the same as quarantinedNpcCount (in stats the name is the map of NPC id to reason);"
    " removed in the next release"
)
_NPCS_PER_TIER_DEPRECATED = (
    "Deprecated: the same as decisionsPerTier (the name read as a population); removed in the next release"
)


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False)


class WorldSummary(_Wire):
    """One world as ``GET /api/v1/worlds`` lists it."""

    world_id: int
    name: str | None = None
    state: Literal["running", "paused", "failing", "isolated"]
    world_time: float | None = Field(description="Committed world time, game seconds (null: isolated world)")
    world_time_human: str | None = Field(description="e.g. 'day 3 Wed 08:30'")
    time_scale: float | None
    tick_interval_seconds: float | None
    tick_rate: float | None = Field(description="Measured ticks per second over recent ticks")
    lag_p99_seconds: float | None = Field(description="p99 of tick start lag over recent ticks")
    ticks_processed: int | None
    ticks_skipped: int | None
    ticks_failed: int | None
    decisions_per_tier: dict[str, int] = Field(description="NPC decisions in the last tick, per tier")
    npcs_per_tier: dict[str, int] = Field(deprecated=True, description=_NPCS_PER_TIER_DEPRECATED)
    npcs_simulated_total: int | None
    jobs_enqueued_last_tick: int | None
    config_version: int
    last_error: str | None
    isolated: bool = Field(
        description="Not ticking: its stored row, config or behaviour is invalid (lastError says why)"
    )
    quarantined_npc_count: int = Field(
        default=0, description="NPC rows that cannot be decided, kept frozen until fixed (stats: which and why)"
    )
    quarantined_npcs: int = Field(default=0, deprecated=True, description=_QUARANTINED_NPCS_DEPRECATED)
    lease_owner: str | None = Field(
        default=None, description="Instance id of the daemon holding the world's lease (PostgreSQL; null: none)"
    )
    lease_epoch: int | None = Field(default=None, description="Fencing epoch of that lease")


class PageQuery(BaseModel):
    """``GET /api/v1/worlds`` query: a page of worlds by id (unknown parameters are refused)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description=f"Worlds per page (at most {MAX_PAGE_SIZE})"
    )
    cursor: int | None = Field(default=None, ge=0, le=MAX_WORLD_ID, description="nextCursor of the previous page")


class WorldList(_Wire):
    """One page of worlds, by id."""

    worlds: list[WorldSummary]
    next_cursor: int | None = Field(
        default=None, description="Pass as ?cursor= for the next page; null on the last page"
    )
    total: int = Field(default=0, description="Worlds this daemon runs or has isolated, on every page")


class PauseResponse(_Wire):
    world_id: int
    paused: bool
    world_time: float


class TickRequest(_Wire):
    # strict: `true` or "1" is not a number of seconds (lax mode would coerce both).
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False, extra="forbid", strict=True
    )

    delta_seconds: float = Field(ge=0, description="Real seconds the tick covers (0 … the world's maxCatchUpSeconds)")


class TickResponse(_Wire):
    world_id: int
    world_time_before: float
    world_time_after: float
    delta_real_seconds: float
    delta_game_seconds: float
    npcs_simulated: int
    decisions_per_tier: dict[str, int] = Field(description="NPC decisions in this tick, per tier")
    npcs_per_tier: dict[str, int] = Field(deprecated=True, description=_NPCS_PER_TIER_DEPRECATED)
    jobs_enqueued: int
    chain_steps: int
    duration_ms: float
    capped: bool
    paused: bool

    @classmethod
    def of(cls, world_id: int, result: TickResult) -> TickResponse:
        """The wire form of a forced tick's result."""
        return cls(
            world_id=world_id,
            world_time_before=result.world_time_before,
            world_time_after=result.world_time_after,
            delta_real_seconds=result.delta_real_seconds,
            delta_game_seconds=result.delta_game_seconds,
            npcs_simulated=result.npcs_simulated,
            decisions_per_tier=result.npcs_per_tier,
            npcs_per_tier=result.npcs_per_tier,
            jobs_enqueued=result.jobs_enqueued,
            chain_steps=result.chain_steps,
            duration_ms=result.duration_ms,
            capped=result.capped,
            paused=result.paused,
        )


class WorldStats(_Wire):
    """The world context's ``get_stats()``, keys in camelCase."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    world_id: int
    state: str
    current_world_time: float
    ticks_processed: int
    config_version: int
    config: dict[str, Any]
    decisions_per_tier: dict[str, int] = Field(description="NPC decisions in the last tick, per tier")
    tier_population: dict[str, int] = Field(description="NPCs in each tier now")
    npcs_per_tier: dict[str, int] = Field(deprecated=True, description=_NPCS_PER_TIER_DEPRECATED)


class CompleteRequest(_Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)

    status: Literal["succeeded", "failed"]
    error: str | None = Field(default=None, max_length=4000)


class Health(_Wire):
    status: Literal["ok", "unavailable"]
    loop_lag_seconds: float
    database: Literal["ok", "unreachable", "read-only", "not checked"] = "not checked"
    detail: str | None = None


class Detail(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "Missing or wrong bearer token"},
    404: {"model": Detail, "description": "Unknown world"},
    413: {"model": Detail, "description": "Request body too large"},
    422: {"model": Detail, "description": "Invalid request (the detail names the failing fields)"},
    503: {"model": Detail, "description": "Database unavailable (retry later)"},
}


def printable(value: Any) -> Any:
    """Make error details JSON-safe: lone surrogates are shown escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    if isinstance(value, Mapping):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def camelize(value: Any) -> Any:
    """Mapping keys in camelCase, recursively; non-finite floats as null."""
    if isinstance(value, Mapping):
        return {(to_camel(k) if isinstance(k, str) and "_" in k else str(k)): camelize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [camelize(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def etag(version: int) -> str:
    """The ETag of a config version."""
    return f'"{version}"'


async def page_body(page: WorldPage, budget: LoopBudget) -> str:
    """``WorldList`` JSON, encoded a row at a time under the loop budget (pages are up to 1,000 rows)."""
    rows = await budget.map(page.rows, json.dumps)
    tail = json.dumps({"nextCursor": page.next_cursor, "total": page.total})
    return '{"worlds":[' + ",".join(rows) + "]," + tail[1:]
