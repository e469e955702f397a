"""``WorldAdmin``: the operations the admin API offers, as domain calls.

Config patches (merged under the world's row lock, applied before its next
tick), pause/resume, forced ticks, world summaries, stats, readiness. The HTTP
layer (:mod:`scheduler_daemon.http.routes`) maps each call to a route and each
:class:`AdminError` to its status code; nothing here knows about HTTP.

Work that scales with the number of worlds (lists, the metrics text) runs
under a :class:`~scheduler_daemon.loop_budget.LoopBudget`, so admin calls
never take more than their share of the loop that ticks the worlds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from scheduler_daemon.context import WorldSimulationContext, format_world_time
from scheduler_daemon.logs import get_logger
from scheduler_daemon.loop_budget import LoopBudget
from scheduler_daemon.loop_lag import LoopLagMonitor
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.metrics_exposition import Exposition, expose
from scheduler_daemon.runner import BrokenWorld, SchedulerLoopRunner
from scheduler_daemon.scheduler import TickResult, WorldNotRegisteredError, WorldScheduler
from scheduler_daemon.simulation.npc import SIMULATED_TIERS
from scheduler_daemon.storable import storable_problems
from scheduler_daemon.store.errors import InvalidStoredWorldError, WorldNotFoundError, is_database_error
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.worlds import WorldRecord
from scheduler_daemon.world_config import WorldConfig, WorldConfigError, apply_patch, parse_world_config

log = get_logger("scheduler_daemon.admin")

#: Largest share of the event loop that admin work over many worlds may take (see loop_budget).
ADMIN_LOOP_SHARE = 0.2
#: Readiness fails while the event loop lags more than this.
READY_MAX_LOOP_LAG_SECONDS = 0.5
#: Readiness's database check timeout.
READY_DB_TIMEOUT_SECONDS = 2.0


# ------------------------------------------------------------------ errors
class AdminError(Exception):
    """A refused admin call; ``status`` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else "invalid request")
        self.detail = detail


class NotFound(AdminError):
    """Unknown world or request, or a world not running on this daemon."""

    status = 404


class Conflict(AdminError):
    """The stored row or config cannot be used as it is, or a request cannot take that status."""

    status = 409


class PreconditionFailed(AdminError):
    """``If-Match`` names a config version that is no longer current."""

    status = 412


class Invalid(AdminError):
    """Invalid input; ``detail`` lists ``{loc, msg, type}`` per failing field."""

    status = 422

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__(
            [
                {"loc": ["body", *[p for p in loc.split(".") if p]], "msg": msg, "type": "value_error"}
                for loc, msg in errors
            ]
        )


class Unavailable(AdminError):
    """The database failed the call; worth retrying."""

    status = 503


class GenerationCompleter(Protocol):
    """Marks a generation request finished (provided by the generation feature).

    Raises :class:`LookupError` for an unknown request and :class:`ValueError`
    for a request that cannot take that status (e.g. already finished).
    """

    def __call__(self, request_id: int, status: str, error: str | None) -> Awaitable[Mapping[str, Any]]: ...


@dataclass(frozen=True)
class WorldPage:
    """One page of world summaries (camelCase dicts, the API's ``WorldSummary`` shape)."""

    rows: list[dict[str, Any]]
    next_cursor: int | None
    total: int


@dataclass(frozen=True)
class Readiness:
    """Whether commits can succeed now; ``problems`` is empty when ready."""

    problems: list[str]
    database: Literal["ok", "unreachable", "read-only"]
    loop_lag_seconds: float


@dataclass
class WorldAdmin:
    """Domain operations of the admin API over one daemon's store, scheduler and runner."""

    store: Store
    scheduler: WorldScheduler
    runner: SchedulerLoopRunner
    metrics: SchedulerMetrics
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    #: Completes generation requests (``None``: no generation queue in this build).
    complete_generation: GenerationCompleter | None = None
    #: False while the daemon stops (readiness then fails).
    accepting: Callable[[], bool] = lambda: True
    #: The loop share work over many worlds may take from ticks.
    budget: LoopBudget = field(default_factory=lambda: LoopBudget(ADMIN_LOOP_SHARE))

    # ------------------------------------------------------------ reading
    async def world_page(self, limit: int, cursor: int | None) -> WorldPage:
        """Worlds this daemon runs (and isolated ones) with ids above ``cursor``, ``limit`` at a time.

        Everything but the names comes from memory; rows are built under the loop budget.
        """
        contexts = self.scheduler.get_all_contexts()
        broken = self.runner.broken
        after = -1 if cursor is None else cursor
        ids = await self.budget.call(
            lambda: heapq.nsmallest(limit + 1, (w for w in itertools.chain(contexts, broken) if w > after))
        )
        more = len(ids) > limit
        ids = ids[:limit]
        names = await self.store.world_names(ids)

        def row(world_id: int) -> dict[str, Any] | None:
            # Read now, not from the snapshot: a world may have left (lease lost,
            # isolation dropped) while the names were read.
            if self.scheduler.is_registered(world_id):
                rate, p99 = self.metrics.recent_tick_stats(world_id)
                ctx, lease = self.scheduler.get_context(world_id), self.scheduler.get_lease(world_id)
                return running_summary(ctx, names.get(world_id), rate, p99, lease)
            if (isolated := broken.get(world_id)) is not None:
                return isolated_summary(world_id, names.get(world_id), isolated)
            return None

        rows = [r for r in await self.budget.map(ids, row) if r is not None]
        return WorldPage(rows, ids[-1] if more else None, len(contexts) + len(broken))

    async def config(self, world_id: int) -> tuple[WorldConfig, int]:
        """The world's effective config (stored config over the defaults) and its version."""
        record = await self._world(world_id)
        try:
            config = parse_world_config(
                record.require_valid().simulation_raw, world_id=world_id, defaults=self.scheduler.defaults
            )
        except (WorldConfigError, InvalidStoredWorldError) as exc:
            raise Conflict(str(exc)) from None
        return config, record.config_version

    def stats(self, world_id: int) -> dict[str, Any]:
        """The running world's ``get_stats()``."""
        return self._context(world_id).get_stats()

    async def metrics_exposition(self, accept: str, accept_encoding: str) -> Exposition:
        """``/metrics`` for a request with these headers: refreshed, collected under the loop budget, rendered off it.

        Rendering (text escaping, gzip) is most of a scrape's work; at 10,000
        worlds with ``[metrics] per_world`` it held the loop for over a second.
        """
        await self.metrics.refresh()
        snapshot = await self.budget.call(self.metrics.snapshot)
        return await asyncio.to_thread(expose, snapshot, accept=accept, accept_encoding=accept_encoding)

    async def readiness(self) -> Readiness:
        """Database accepts writes, ticks commit, loop lag under the threshold, not stopping."""
        lag = self.loop_lag.lag_seconds
        problems = []
        database: Literal["ok", "unreachable", "read-only"] = "ok"
        try:
            async with asyncio.timeout(READY_DB_TIMEOUT_SECONDS):
                refusal = await self.store.write_refusal()
            if refusal is not None:
                database = "read-only"
                problems.append(f"database refuses writes: {refusal}")
                self.metrics.db_error("readiness")
        except Exception as exc:
            database = "unreachable"
            problems.append(f"database: {type(exc).__name__}")
            if is_database_error(exc) or isinstance(exc, TimeoutError):
                self.metrics.db_error("readiness")
        ticks = self.runner.ticks_problem()
        if ticks is not None:
            problems.append(ticks)
        if lag > READY_MAX_LOOP_LAG_SECONDS:
            problems.append(f"event loop lag {lag:.3f}s > {READY_MAX_LOOP_LAG_SECONDS}s")
        if not self.accepting():
            problems.append("stopping")
        return Readiness(problems, database, lag)

    # ------------------------------------------------------------ writing
    async def patch_config(self, world_id: int, patch: Any, if_match: str | None = None) -> tuple[WorldConfig, int]:
        """Merge ``patch`` into the stored config, validate, persist (version + 1), apply before the next tick.

        A config that pauses the world commits its clock before answering (see
        :meth:`set_paused`). ``if_match`` (an ETag list) makes the write
        conditional on the current version.
        """
        if isinstance(patch, Mapping):
            problems = storable_problems(patch)
            if problems:
                raise Invalid(problems)
        merged: list[WorldConfig] = []

        def change(record: WorldRecord) -> Mapping[str, Any]:
            if if_match is not None and not if_match_ok(if_match, record.config_version):
                raise PreconditionFailed(
                    f"world {world_id}: config version is {record.config_version}, If-Match was {if_match}"
                )
            try:
                new_raw, config = apply_patch(_raw(record), patch, world_id=world_id, defaults=self.scheduler.defaults)
            except WorldConfigError as exc:
                raise Invalid(exc.errors) from None
            merged.append(config)
            return new_raw

        written = await self._change(world_id, change)
        log.info(
            "world_config_changed_via_api",
            world_id=world_id,
            config_version=written.config_version,
            patch=patch,
        )
        if merged[-1].pause_simulation:
            # A pause by config write takes effect before it answers, as set_paused's does.
            await self._freeze(world_id, float(written.world_time or 0.0))
        return merged[-1], written.config_version

    async def set_paused(self, world_id: int, paused: bool) -> tuple[float, int]:
        """Pause or resume (idempotent); returns the world time and the config version.

        A pause takes effect before it answers: the game time accrued since
        the world's last tick is committed at once (``freeze_paused``), so the
        world time returned is the one the world stays at.
        """
        defaults = self.scheduler.defaults

        def change(record: WorldRecord) -> Mapping[str, Any] | None:
            current = _raw(record)
            try:
                if parse_world_config(current, world_id=world_id, defaults=defaults).pause_simulation == paused:
                    return None  # already so: no new version
            except WorldConfigError:
                pass  # the patch below names what is invalid
            try:
                return apply_patch(current, {"pauseSimulation": paused}, world_id=world_id, defaults=defaults)[0]
            except WorldConfigError as exc:
                raise Invalid(exc.errors) from None

        written = await self._change(world_id, change)
        world_time = float(written.world_time or 0.0)
        if paused:
            world_time = await self._freeze(world_id, world_time)
        elif self.scheduler.is_registered(world_id):
            world_time = self.scheduler.get_context(world_id).current_world_time
        return world_time, written.config_version

    async def _freeze(self, world_id: int, stored_world_time: float) -> float:
        """The world time a world just paused stays at, committed; ``stored_world_time`` if it does not run here."""
        try:
            return await self.runner.freeze_paused(world_id)
        except WorldNotRegisteredError:
            return stored_world_time
        except Exception as exc:
            if is_database_error(exc):
                raise Unavailable(
                    f"world {world_id} is paused, but its clock could not be committed at the pause "
                    f"({type(exc).__name__}); its next tick commits it: call pause again to get the frozen time"
                ) from None
            raise

    async def force_tick(self, world_id: int, delta_seconds: float) -> TickResult:
        """One extra tick now covering ``delta_seconds`` of real time (never overlaps a regular tick)."""
        cap = self._context(world_id).config.max_catch_up_seconds
        if delta_seconds > cap:
            raise Invalid([("deltaSeconds", f"must be at most maxCatchUpSeconds ({cap:g})")])
        try:
            return await self.runner.force_tick(world_id, delta_seconds)
        except WorldNotRegisteredError:
            raise NotFound(f"world {world_id} is not running on this daemon") from None
        except Exception as exc:
            if is_database_error(exc):
                raise Unavailable(f"tick failed: {type(exc).__name__}") from None
            raise

    async def finish_generation(self, request_id: int, status: str, error: str | None) -> Mapping[str, Any]:
        """Mark a handed-out generation request ``succeeded`` or ``failed``."""
        if self.complete_generation is None:
            raise NotFound(f"generation request {request_id} not found (no job queue in this build)")
        try:
            return await self.complete_generation(request_id, status, error)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        except ValueError as exc:
            raise Conflict(str(exc)) from None

    # ------------------------------------------------------------ helpers
    async def _world(self, world_id: int) -> WorldRecord:
        try:
            return await self.store.get_world(world_id)
        except WorldNotFoundError as exc:
            raise NotFound(str(exc)) from None

    def _context(self, world_id: int) -> WorldSimulationContext:
        try:
            return self.scheduler.get_context(world_id)
        except WorldNotRegisteredError:
            broken = self.runner.broken.get(world_id)
            if broken is not None:
                raise NotFound(f"world {world_id} is isolated: {broken.error}") from None
            raise NotFound(f"world {world_id} is not running on this daemon") from None

    async def _change(self, world_id: int, change: Callable[[WorldRecord], Mapping[str, Any] | None]) -> WorldRecord:
        """Read-modify-write the world's config under its row lock, then apply it before the world's next tick.

        Concurrent writers are serialized by the database, each merging into
        the latest version, so an unconditional change never conflicts.
        """
        try:
            written = await self.store.change_world_simulation(world_id, change)
        except WorldNotFoundError as exc:
            raise NotFound(str(exc)) from None
        except InvalidStoredWorldError as exc:
            raise Conflict(f"{exc}; fix the stored row first") from None
        if self.scheduler.is_registered(world_id):
            try:
                await self.runner.apply_world_config(world_id, written)
            except (ValueError, LookupError) as exc:
                # The stored config is valid, something else of the world is
                # not (e.g. its behaviour content): discovery isolates it.
                log.error("world_config_apply_failed", world_id=world_id, error=str(exc))
        return written


def _raw(record: WorldRecord) -> Mapping[str, Any]:
    return record.simulation_raw if isinstance(record.simulation_raw, Mapping) else {}


def if_match_ok(header: str, version: int) -> bool:
    """Whether an ``If-Match`` header (ETags, ``*``, weak tags) matches ``version``."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == str(version):
            return True
    return False


def running_summary(
    ctx: WorldSimulationContext, name: str | None, rate: float | None, p99: float | None, lease: Lease | None
) -> dict[str, Any]:
    """A running world as the API's ``WorldSummary``, built without a model (lists are thousands long)."""
    return {
        "worldId": ctx.world_id,
        "name": name,
        "state": ctx.state,
        "worldTime": ctx.current_world_time,
        "worldTimeHuman": format_world_time(ctx.current_world_time),
        "timeScale": ctx.config.time_scale,
        "tickIntervalSeconds": ctx.config.tick_interval_seconds,
        "tickRate": rate,
        "lagP99Seconds": p99,
        "ticksProcessed": ctx.ticks_processed,
        "ticksSkipped": ctx.ticks_skipped,
        "ticksFailed": ctx.ticks_failed,
        "decisionsPerTier": {t.label: ctx.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
        "npcsPerTier": {t.label: ctx.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},  # deprecated name
        "npcsSimulatedTotal": ctx.npcs_simulated_total,
        "jobsEnqueuedLastTick": ctx.jobs_enqueued_last_tick,
        "configVersion": ctx.config_version,
        "lastError": ctx.last_error,
        "isolated": False,
        "quarantinedNpcCount": len(ctx.quarantined_npcs),
        "quarantinedNpcs": len(ctx.quarantined_npcs),  # deprecated name
        "leaseOwner": lease.owner if lease else None,
        "leaseEpoch": lease.epoch if lease else None,
    }


def isolated_summary(world_id: int, name: str | None, broken: BrokenWorld) -> dict[str, Any]:
    """An isolated world as the API's ``WorldSummary``."""
    return {
        "worldId": world_id,
        "name": name,
        "state": "isolated",
        "worldTime": None,
        "worldTimeHuman": None,
        "timeScale": None,
        "tickIntervalSeconds": None,
        "tickRate": None,
        "lagP99Seconds": None,
        "ticksProcessed": None,
        "ticksSkipped": None,
        "ticksFailed": None,
        "decisionsPerTier": {},
        "npcsPerTier": {},
        "npcsSimulatedTotal": None,
        "jobsEnqueuedLastTick": None,
        "configVersion": broken.config_version,
        "lastError": broken.error,
        "isolated": True,
        "quarantinedNpcCount": 0,
        "quarantinedNpcs": 0,  # deprecated name
        "leaseOwner": None,
        "leaseEpoch": None,
    }
