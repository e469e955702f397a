"""The HTTP server: admin API (``/api/v1``), ``/metrics``, ``/healthz``, ``/readyz``.

FastAPI served by uvicorn inside the daemon's own event loop. The daemon binds
the listening socket itself (so "address in use" is a clean startup error and
``READY=1`` comes only once the port is bound) and keeps its own signal
handling: :class:`EmbeddedServer` never installs uvicorn's. Every connection
goes through a :class:`~scheduler_daemon.http_connections.ConnectionGuard`
(connection limit, request deadline).

Every ``/api/v1`` route needs ``Authorization: Bearer <token>`` when a token is
configured (``[http] admin_token_file`` or the systemd credential
``admin-token``), compared in constant time. Without a token the daemon only
binds loopback addresses (see :func:`check_bind_allowed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import hmac
import ipaddress
import itertools
import json
import math
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import structlog
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler_daemon.context import WorldSimulationContext, format_world_time
from scheduler_daemon.http_connections import LISTEN_BACKLOG, ConnectionGuard
from scheduler_daemon.loop_budget import LoopBudget
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import BrokenWorld, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldNotRegisteredError
from scheduler_daemon.settings import HttpSettings, SettingsError
from scheduler_daemon.simulation.npc import SIMULATED_TIERS
from scheduler_daemon.store.errors import is_database_error
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.repository import InvalidStoredWorldError, WorldNotFoundError, WorldRecord
from scheduler_daemon.world_config import WorldConfig, WorldConfigError, apply_patch, parse_world_config

log = structlog.get_logger("scheduler_daemon.http")

#: Idle keep-alive connections are closed after this long. Longer than clients keep
#: them (httpx 5 s, uvicorn's own default 5 s): a client sending on a connection
#: the server is closing at the same moment gets a connection error, not an answer,
#: and a busy event loop runs the idle timer late, which widens that race.
KEEP_ALIVE_SECONDS = 75
#: Request bodies larger than this are refused with 413 (a config patch is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Deepest JSON nesting accepted in a config patch.
MAX_JSON_DEPTH = 32
#: ``/readyz`` fails while the event loop lags more than this.
READY_MAX_LOOP_LAG_SECONDS = 0.5
#: ``/readyz`` database ping timeout.
READY_DB_TIMEOUT_SECONDS = 2.0
#: Largest share of the event loop that admin work over many worlds may take (see loop_budget).
ADMIN_LOOP_SHARE = 0.2
#: ``GET /api/v1/worlds`` page sizes: the default and the largest a client may ask for.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Largest token file read (a token is a few dozen bytes).
MAX_TOKEN_BYTES = 4096
#: systemd credential name (``LoadCredential=admin-token:…``).
CREDENTIAL_NAME = "admin-token"

MAX_WORLD_ID = 2**31 - 1
MAX_REQUEST_ID = 2**63 - 1

_bearer = HTTPBearer(auto_error=False, description="The admin token ([http] admin_token_file)")

WorldId = Annotated[int, PathParam(ge=1, le=MAX_WORLD_ID, description="World id")]


# --------------------------------------------------------------------- auth
def token_path(http: HttpSettings) -> Path | None:
    """Where the admin token comes from: the setting, else the systemd credential if present."""
    if http.admin_token_file is not None:
        return http.admin_token_file
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        candidate = Path(creds) / CREDENTIAL_NAME
        if candidate.exists():
            return candidate
    return None


def load_admin_token(http: HttpSettings) -> str | None:
    """Read the admin token (surrounding whitespace stripped); ``None`` if none is configured.

    Raises :class:`~scheduler_daemon.settings.SettingsError` naming the file
    when it is configured but missing, unreadable, empty or absurdly large.
    """
    path = token_path(http)
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"http.admin_token_file: {path}: file not found") from None
    except PermissionError:
        raise SettingsError(f"http.admin_token_file: {path}: permission denied") from None
    except OSError as exc:
        raise SettingsError(f"http.admin_token_file: {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise SettingsError(f"http.admin_token_file: {path}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingsError(f"http.admin_token_file: {path}: not valid UTF-8") from None
    if not token:
        raise SettingsError(f"http.admin_token_file: {path}: file is empty")
    if any(c.isspace() for c in token):
        raise SettingsError(f"http.admin_token_file: {path}: token must be one line without spaces")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(http: HttpSettings, token: str | None) -> None:
    """Refuse to expose an unauthenticated admin API beyond loopback."""
    if token is None and not is_loopback(http.bind):
        raise SettingsError(
            f"http.bind: {http.bind} is not a loopback address and no admin token is configured "
            "(set http.admin_token_file or the systemd credential admin-token)"
        )


# ------------------------------------------------------------- loop health
class LoopLagMonitor:
    """Measures how late the event loop wakes a periodic sleeper (its responsiveness)."""

    def __init__(self, interval: float = 0.1, window: int = 10) -> None:
        self.interval = interval
        self._samples: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_seconds(self) -> float:
        """Worst lag over the recent window (0 before the first sample)."""
        return max(self._samples, default=0.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            self._samples.append(max(loop.time() - started - self.interval, 0.0))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# ---------------------------------------------------------------- wire models
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
    npcs_per_tier: dict[str, int] = Field(description="NPC decisions in the last tick, per tier")
    npcs_simulated_total: int | None
    jobs_enqueued_last_tick: int | None
    config_version: int
    last_error: str | None
    isolated: bool = Field(
        description="Not ticking: its stored row, config or behaviour is invalid (lastError says why)"
    )
    quarantined_npcs: int = Field(default=0, description="NPC rows that cannot be decided, kept frozen until fixed")
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
    npcs_per_tier: dict[str, int]
    jobs_enqueued: int
    chain_steps: int
    duration_ms: float
    capped: bool
    paused: bool


class WorldStats(_Wire):
    """The world context's ``get_stats()``, keys in camelCase."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    world_id: int
    state: str
    current_world_time: float
    ticks_processed: int
    config_version: int
    config: dict[str, Any]


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


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "Missing or wrong bearer token"},
    404: {"model": Detail, "description": "Unknown world"},
    413: {"model": Detail, "description": "Request body too large"},
    422: {"model": Detail, "description": "Invalid request (the detail names the failing fields)"},
    503: {"model": Detail, "description": "Database unavailable (retry later)"},
}


class GenerationCompleter(Protocol):
    """Marks a generation request finished (provided by the jobs feature).

    Raises :class:`LookupError` for an unknown request and :class:`ValueError`
    for a request that cannot take that status (e.g. already finished).
    """

    def __call__(self, request_id: int, status: str, error: str | None) -> Awaitable[Mapping[str, Any]]: ...


# ----------------------------------------------------------------- the app
@dataclass
class AdminBackend:
    """What the HTTP layer needs from the daemon."""

    runner: SchedulerLoopRunner
    metrics: SchedulerMetrics
    #: Returns the current admin token (``None``: no token configured, API open on loopback).
    token: Callable[[], str | None]
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    #: ``POST /api/v1/generation/{id}/complete`` (``None`` until the jobs feature provides it).
    complete_generation: GenerationCompleter | None = None
    #: False while the daemon stops (``/readyz`` then says 503).
    accepting: Callable[[], bool] = lambda: True
    #: The loop share work over many worlds (lists, ``/metrics``) may take from ticks.
    budget: LoopBudget = field(default_factory=lambda: LoopBudget(ADMIN_LOOP_SHARE))

    @property
    def scheduler_defaults(self) -> dict[str, Any]:
        return self.runner.scheduler.defaults


class BodySizeLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413.

    The body is read up front (it is small by definition) and replayed to the
    app, so a chunked upload without ``Content-Length`` is capped too.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _printable(value: Any) -> Any:
    """Make error details JSON-safe: lone surrogates are shown escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    if isinstance(value, Mapping):
        return {_printable(k): _printable(v) for k, v in value.items()}
    return value


def _camelize(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {(to_camel(k) if isinstance(k, str) and "_" in k else str(k)): _camelize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_camelize(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _storable_problems(value: Any, path: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Values JSON columns on both databases cannot store (or that nest absurdly deep)."""
    if depth > MAX_JSON_DEPTH:
        return [(path, f"nested deeper than {MAX_JSON_DEPTH} levels")]
    if isinstance(value, str):
        if "\x00" in value:
            return [(path, "NUL characters are not allowed")]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [(path, "not valid Unicode (lone surrogate)")]
        return []
    if isinstance(value, Mapping):
        problems = []
        for k, v in value.items():
            key_path = f"{path}.{k}" if path else str(k)
            problems += _storable_problems(k, key_path, depth + 1)
            problems += _storable_problems(v, key_path, depth + 1)
        return problems
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _storable_problems(v, f"{path}.{i}", depth + 1)]
    return []


def _unprocessable(errors: list[tuple[str, str]]) -> HTTPException:
    return HTTPException(
        422,
        detail=_printable(
            [
                {"loc": ["body", *[p for p in loc.split(".") if p]], "msg": msg, "type": "value_error"}
                for loc, msg in errors
            ]
        ),
    )


def _etag(version: int) -> str:
    return f'"{version}"'


def _if_match_ok(header: str, version: int) -> bool:
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == str(version):
            return True
    return False


def _world_row(
    ctx: WorldSimulationContext, name: str | None, rate: float | None, p99: float | None, lease: Lease | None
) -> dict[str, Any]:
    """A running world as :class:`WorldSummary` on the wire, built without a model (lists are thousands long)."""
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
        "npcsPerTier": {t.label: ctx.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
        "npcsSimulatedTotal": ctx.npcs_simulated_total,
        "jobsEnqueuedLastTick": ctx.jobs_enqueued_last_tick,
        "configVersion": ctx.config_version,
        "lastError": ctx.last_error,
        "isolated": False,
        "quarantinedNpcs": len(ctx.quarantined_npcs),
        "leaseOwner": lease.owner if lease else None,
        "leaseEpoch": lease.epoch if lease else None,
    }


def _isolated_row(world_id: int, name: str | None, broken: BrokenWorld) -> dict[str, Any]:
    """An isolated world as :class:`WorldSummary` on the wire."""
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
        "npcsPerTier": {},
        "npcsSimulatedTotal": None,
        "jobsEnqueuedLastTick": None,
        "configVersion": broken.config_version,
        "lastError": broken.error,
        "isolated": True,
        "quarantinedNpcs": 0,
        "leaseOwner": None,
        "leaseEpoch": None,
    }


def create_app(backend: AdminBackend) -> FastAPI:
    """The FastAPI application (also used directly by tests through an ASGI transport)."""
    from scheduler_daemon import __version__

    app = FastAPI(
        title="scheduler-daemon admin API",
        version=__version__,
        description=(
            "Steer the World Simulation Scheduler: list worlds, read and change a world's scheduler "
            "config, pause/resume, force a tick, read stats. JSON, camelCase. Every /api/v1 route "
            "needs `Authorization: Bearer <token>` when an admin token is configured."
        ),
        docs_url=None,
        redoc_url=None,
    )

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        expected = backend.token()
        if expected is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8")):
            raise HTTPException(401, detail="missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Echoing the input back could contain NaN (not JSON); keep loc/msg/type.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": _printable(errors)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. not UTF-8): a bad body is 422 here.
            return JSONResponse(status_code=422, content={"detail": "request body is not valid JSON"})
        return await http_exception_handler(request, exc)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> Response:
        # Not the client's fault and worth retrying: 503, counted.
        backend.metrics.db_error("admin api")
        log.error("admin API request failed in the database", path=request.url.path, error=str(exc)[:500])
        return JSONResponse(status_code=503, content={"detail": f"database unavailable: {type(exc).__name__}"})

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": "JSON nested too deeply"})

    store = backend.runner.scheduler.store
    runner = backend.runner
    scheduler = runner.scheduler

    async def _get_world(world_id: int) -> WorldRecord:
        try:
            return await store.get_world(world_id)
        except WorldNotFoundError as exc:
            raise HTTPException(404, detail=str(exc)) from None

    def _registered_context(world_id: int) -> Any:
        try:
            return scheduler.get_context(world_id)
        except WorldNotRegisteredError:
            broken = runner.broken.get(world_id)
            if broken is not None:
                raise HTTPException(404, detail=f"world {world_id} is isolated: {broken.error}") from None
            raise HTTPException(404, detail=f"world {world_id} is not running on this daemon") from None

    async def _change(world_id: int, change: Callable[[WorldRecord], Mapping[str, Any] | None]) -> WorldRecord:
        """Read-modify-write the world's config under its row lock, then apply it before the world's next tick.

        Concurrent writers are serialized by the database, each merging into
        the latest version, so an unconditional change never conflicts.
        """
        try:
            written = await store.change_world_simulation(world_id, change)
        except WorldNotFoundError as exc:
            raise HTTPException(404, detail=str(exc)) from None
        except InvalidStoredWorldError as exc:
            raise HTTPException(409, detail=f"{exc}; fix the stored row first") from None
        if scheduler.is_registered(world_id):
            try:
                await runner.apply_world_config(world_id, written)
            except (ValueError, LookupError) as exc:
                # The stored config is valid, something else of the world is
                # not (e.g. its behaviour content): discovery isolates it.
                log.error("world could not apply its new config", world_id=world_id, error=str(exc))
        return written

    async def _write_patch(world_id: int, patch: Any, if_match: str | None) -> tuple[WorldConfig, int]:
        """Merge, validate, persist with an incremented config_version, apply before the next tick."""
        if isinstance(patch, Mapping):
            problems = _storable_problems(patch)
            if problems:
                raise _unprocessable(problems)
        merged: list[WorldConfig] = []

        def change(record: WorldRecord) -> Mapping[str, Any]:
            if if_match is not None and not _if_match_ok(if_match, record.config_version):
                raise HTTPException(
                    412, detail=f"world {world_id}: config version is {record.config_version}, If-Match was {if_match}"
                )
            current = record.simulation_raw if isinstance(record.simulation_raw, Mapping) else {}
            try:
                new_raw, config = apply_patch(current, patch, world_id=world_id, defaults=backend.scheduler_defaults)
            except WorldConfigError as exc:
                raise _unprocessable(exc.errors) from None
            merged.append(config)
            return new_raw

        written = await _change(world_id, change)
        log.info(
            "world config changed over the admin API",
            world_id=world_id,
            config_version=written.config_version,
            patch=patch,
        )
        return merged[-1], written.config_version

    async def _pause(world_id: int, paused: bool, response: Response) -> PauseResponse:
        def change(record: WorldRecord) -> Mapping[str, Any] | None:
            current = record.simulation_raw if isinstance(record.simulation_raw, Mapping) else {}
            try:
                if (
                    parse_world_config(current, world_id=world_id, defaults=backend.scheduler_defaults).pause_simulation
                    == paused
                ):
                    return None  # already so: idempotent, no new version
            except WorldConfigError:
                pass  # the patch below names what is invalid
            try:
                return apply_patch(
                    current, {"pauseSimulation": paused}, world_id=world_id, defaults=backend.scheduler_defaults
                )[0]
            except WorldConfigError as exc:
                raise _unprocessable(exc.errors) from None

        written = await _change(world_id, change)
        world_time = (
            scheduler.get_context(world_id).current_world_time
            if scheduler.is_registered(world_id)
            else float(written.world_time or 0.0)
        )
        response.headers["ETag"] = _etag(written.config_version)
        return PauseResponse(world_id=world_id, paused=paused, world_time=world_time)

    v1 = APIRouter(prefix="/api/v1", dependencies=[Depends(require_token)], responses=_ERRORS)

    @v1.get(
        "/worlds",
        summary="Registered worlds",
        responses={200: {"model": WorldList, "description": "A page of worlds, by id"}},
    )
    async def list_worlds(page_query: Annotated[PageQuery, Query()]) -> Response:
        """Worlds this daemon runs (and isolated ones), by id, a page at a time.

        State, world time, tick rate and last error come from the daemon's
        memory; only the page's names are read from the database.
        """
        budget = backend.budget
        contexts = scheduler.get_all_contexts()
        broken = runner.broken
        limit, after = page_query.limit, -1 if page_query.cursor is None else page_query.cursor
        page = await budget.call(
            lambda: heapq.nsmallest(limit + 1, (w for w in itertools.chain(contexts, broken) if w > after))
        )
        more = len(page) > limit
        page = page[:limit]
        names = await store.world_names(page)

        def row(world_id: int) -> str:
            ctx = contexts.get(world_id)
            if ctx is None:
                return json.dumps(_isolated_row(world_id, names.get(world_id), broken[world_id]))
            rate, p99 = backend.metrics.recent_tick_stats(world_id)
            return json.dumps(_world_row(ctx, names.get(world_id), rate, p99, scheduler.get_lease(world_id)))

        rows = await budget.map(page, row)
        tail = json.dumps({"nextCursor": page[-1] if more else None, "total": len(contexts) + len(broken)})
        # Serialized piece by piece above (under the budget), not by FastAPI in one go.
        return Response('{"worlds":[' + ",".join(rows) + "]," + tail[1:], media_type="application/json")

    @v1.get(
        "/worlds/{world_id}/scheduler/config",
        response_model=WorldConfig,
        response_model_by_alias=True,
        responses={409: {"model": Detail, "description": "The stored row or config is invalid"}},
        summary="Effective scheduler config",
    )
    async def get_config(world_id: WorldId, response: Response) -> WorldConfig:
        """The world's effective, validated config (stored config over the daemon's defaults). ETag: config version."""
        record = await _get_world(world_id)
        try:
            config = parse_world_config(
                record.require_valid().simulation_raw, world_id=world_id, defaults=backend.scheduler_defaults
            )
        except (WorldConfigError, InvalidStoredWorldError) as exc:
            raise HTTPException(409, detail=str(exc)) from None
        response.headers["ETag"] = _etag(record.config_version)
        return config

    @v1.put(
        "/worlds/{world_id}/scheduler/config",
        response_model=WorldConfig,
        response_model_by_alias=True,
        responses={
            409: {"model": Detail, "description": "The world's stored row cannot be used (its meta is not an object)"},
            412: {"model": Detail, "description": "If-Match does not match the current config version"},
        },
        summary="Change the scheduler config (partial)",
    )
    async def put_config(
        world_id: WorldId,
        response: Response,
        patch: Annotated[
            dict[str, Any],
            Body(
                description="Partial config merged into the stored one (JSON merge patch; null removes a key)",
                openapi_examples={
                    "speed": {"summary": "Speed up time", "value": {"timeScale": 120}},
                    "budget": {"summary": "Budget", "value": {"maxNpcTicksPerStep": 25, "tickIntervalSeconds": 2.0}},
                },
            ),
        ],
        if_match: Annotated[str | None, Header(description="ETag of the config this change is based on")] = None,
    ) -> WorldConfig:
        """Validate, persist (config_version + 1) and apply before the world's next tick."""
        config, version = await _write_patch(world_id, patch, if_match)
        response.headers["ETag"] = _etag(version)
        return config

    @v1.post(
        "/worlds/{world_id}/scheduler/pause",
        response_model=PauseResponse,
        summary="Pause (idempotent)",
        responses={409: {"model": Detail, "description": "The world's stored row cannot be used"}},
    )
    async def pause(world_id: WorldId, response: Response) -> PauseResponse:
        """Freeze the world's clock (``pauseSimulation: true``, persisted)."""
        return await _pause(world_id, True, response)

    @v1.post(
        "/worlds/{world_id}/scheduler/resume",
        response_model=PauseResponse,
        summary="Resume (idempotent)",
        responses={409: {"model": Detail, "description": "The world's stored row cannot be used"}},
    )
    async def resume(world_id: WorldId, response: Response) -> PauseResponse:
        """Let the world's clock run again; resuming never jumps."""
        return await _pause(world_id, False, response)

    @v1.post("/worlds/{world_id}/scheduler/tick", response_model=TickResponse, summary="Force one tick")
    async def force_tick(world_id: WorldId, body: TickRequest) -> TickResponse:
        """Run one extra tick now covering ``deltaSeconds`` of real time (never overlaps a regular tick)."""
        ctx = _registered_context(world_id)
        cap = ctx.config.max_catch_up_seconds
        if body.delta_seconds > cap:
            raise _unprocessable([("deltaSeconds", f"must be at most maxCatchUpSeconds ({cap:g})")])
        try:
            result = await runner.force_tick(world_id, body.delta_seconds)
        except WorldNotRegisteredError:
            raise HTTPException(404, detail=f"world {world_id} is not running on this daemon") from None
        except Exception as exc:
            if is_database_error(exc):
                raise HTTPException(503, detail=f"tick failed: {type(exc).__name__}") from None
            raise
        return TickResponse(
            world_id=world_id,
            world_time_before=result.world_time_before,
            world_time_after=result.world_time_after,
            delta_real_seconds=result.delta_real_seconds,
            delta_game_seconds=result.delta_game_seconds,
            npcs_simulated=result.npcs_simulated,
            npcs_per_tier=result.npcs_per_tier,
            jobs_enqueued=result.jobs_enqueued,
            chain_steps=result.chain_steps,
            duration_ms=result.duration_ms,
            capped=result.capped,
            paused=result.paused,
        )

    @v1.get("/worlds/{world_id}/scheduler/stats", response_model=WorldStats, summary="World stats")
    async def stats(world_id: WorldId) -> Any:
        """The world context's ``get_stats()`` with camelCase keys."""
        ctx = _registered_context(world_id)
        return JSONResponse(_camelize(ctx.get_stats()))

    @v1.post(
        "/generation/{request_id}/complete",
        summary="Report a generation request finished",
        responses={409: {"model": Detail, "description": "The request cannot take that status"}},
    )
    async def complete_generation(
        request_id: Annotated[int, PathParam(ge=1, le=MAX_REQUEST_ID)], body: CompleteRequest
    ) -> Any:
        """For generation workers: mark a handed-out request ``succeeded`` or ``failed``."""
        if backend.complete_generation is None:
            raise HTTPException(404, detail=f"generation request {request_id} not found (no job queue in this build)")
        try:
            result = await backend.complete_generation(request_id, body.status, body.error)
        except LookupError as exc:
            raise HTTPException(404, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        return _camelize(dict(result))

    app.include_router(v1)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        await backend.metrics.refresh()
        body = await backend.budget.call(backend.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", response_model=Health, summary="Liveness", tags=["health"])
    async def healthz() -> Health:
        """The process is alive and its event loop answers."""
        return Health(status="ok", loop_lag_seconds=backend.loop_lag.lag_seconds)

    @app.get(
        "/readyz",
        response_model=Health,
        summary="Readiness",
        tags=["health"],
        responses={
            503: {
                "model": Health,
                "description": "Database unreachable or read-only, ticks failing in the database, loop lagging, "
                "or stopping",
            }
        },
    )
    async def readyz() -> Any:
        """Database accepts writes, ticks commit, event-loop lag under the threshold; 503 otherwise."""
        lag = backend.loop_lag.lag_seconds
        problems = []
        database: Literal["ok", "unreachable", "read-only"] = "ok"
        try:
            async with asyncio.timeout(READY_DB_TIMEOUT_SECONDS):
                refusal = await store.write_refusal()
            if refusal is not None:
                database = "read-only"
                problems.append(f"database refuses writes: {refusal}")
                backend.metrics.db_error("readiness")
        except Exception as exc:
            database = "unreachable"
            problems.append(f"database: {type(exc).__name__}")
            if is_database_error(exc) or isinstance(exc, TimeoutError):
                backend.metrics.db_error("readiness")
        ticks = runner.ticks_problem()
        if ticks is not None:
            problems.append(ticks)
        if lag > READY_MAX_LOOP_LAG_SECONDS:
            problems.append(f"event loop lag {lag:.3f}s > {READY_MAX_LOOP_LAG_SECONDS}s")
        if not backend.accepting():
            problems.append("stopping")
        health = Health(
            status="unavailable" if problems else "ok",
            loop_lag_seconds=lag,
            database=database,
            detail="; ".join(problems) or None,
        )
        if problems:
            return JSONResponse(status_code=503, content=health.model_dump(by_alias=True))
        return health

    app.add_middleware(BodySizeLimit)
    return app


# ------------------------------------------------------------------ server
class HttpBindError(OSError):
    """The HTTP port could not be bound; ``in_use`` tells "address in use" apart."""

    def __init__(self, message: str, *, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: any free port), backlog ``LISTEN_BACKLOG``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HttpBindError(f"http.bind: cannot resolve {host!r}: {exc.strerror}", in_use=False) from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        in_use = exc.errno == errno.EADDRINUSE
        what = "address already in use" if in_use else (exc.strerror or str(exc))
        raise HttpBindError(f"http: cannot bind {host}:{port}: {what}", in_use=in_use) from None
    sock.setblocking(False)
    return sock


class EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpServer:
    """Runs the app on an already bound socket inside the current event loop.

    Every connection is a ``guard.protocol`` (uvicorn's h11 protocol behind the
    guard's connection limit and request deadline).
    """

    def __init__(self, app: Any, sock: socket.socket, guard: ConnectionGuard) -> None:
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=guard.protocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            # asyncio listens again with this (uvicorn's default is 2048): keep bind_socket's bound.
            backlog=LISTEN_BACKLOG,
        )
        self.server = EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        """Start serving; returns once the server accepts connections."""
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
        while not self.server.started:
            if self._task.done():
                await self._task  # raises the startup error
                raise RuntimeError("http server exited during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, finish open requests (uvicorn's graceful shutdown)."""
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket, guard: ConnectionGuard) -> AsyncIterator[HttpServer]:
    """Serve ``app`` on ``sock`` through ``guard`` for the duration of the block."""
    server = HttpServer(app, sock, guard)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
