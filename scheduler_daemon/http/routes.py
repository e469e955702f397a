"""The admin app: ``/api/v1`` routes, ``/metrics``, ``/healthz``, ``/readyz``.

Each route is a few lines: parse the wire model, call the
:class:`~scheduler_daemon.admin.WorldAdmin`, shape the answer. Refusals come
back as :class:`~scheduler_daemon.admin.AdminError` and become their status
code in one handler.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler_daemon.admin import AdminError, WorldAdmin
from scheduler_daemon.http.auth import TokenSource, carries_token, require_token
from scheduler_daemon.http.content_type import JsonBodyRoute, refuse_other_bodies
from scheduler_daemon.http.ingest_routes import body_limit, ingest_routes
from scheduler_daemon.http.middleware import BodySizeLimit
from scheduler_daemon.http.wire import (
    ERRORS,
    CompleteRequest,
    Detail,
    Health,
    PageQuery,
    PauseResponse,
    RequestId,
    TickRequest,
    TickResponse,
    WorldId,
    WorldList,
    WorldStats,
    camelize,
    etag,
    page_body,
    printable,
)
from scheduler_daemon.ingest import IngestAdmin
from scheduler_daemon.logs import get_logger
from scheduler_daemon.world_config import WorldConfig

log = get_logger("scheduler_daemon.http")


def _admin(request: Request) -> WorldAdmin:
    admin: WorldAdmin = request.app.state.admin
    return admin


Admin = Annotated[WorldAdmin, Depends(_admin)]
_STORED_ROW_INVALID: dict[int | str, dict[str, Any]] = {
    409: {"model": Detail, "description": "The world's stored row cannot be used"}
}

# The token first, then the body's Content-Type (see content_type.py).
v1 = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(require_token), Depends(refuse_other_bodies)],
    responses=ERRORS,
    route_class=JsonBodyRoute,
)
open_routes = APIRouter()


@v1.get(
    "/worlds",
    summary="Registered worlds",
    responses={200: {"model": WorldList, "description": "A page of worlds, by id"}},
)
async def list_worlds(admin: Admin, page_query: Annotated[PageQuery, Query()]) -> Response:
    """Worlds this daemon runs (and isolated ones), by id, a page at a time.

    State, world time, tick rate and last error come from the daemon's
    memory; only the page's names are read from the database.
    """
    page = await admin.world_page(page_query.limit, page_query.cursor)
    return Response(await page_body(page, admin.budget), media_type="application/json")


@v1.get(
    "/worlds/{world_id}/scheduler/config",
    response_model=WorldConfig,
    response_model_by_alias=True,
    responses={409: {"model": Detail, "description": "The stored row or config is invalid"}},
    summary="Effective scheduler config",
)
async def get_config(admin: Admin, world_id: WorldId, response: Response) -> WorldConfig:
    """The world's effective, validated config (stored config over the daemon's defaults). ETag: config version."""
    config, version = await admin.config(world_id)
    response.headers["ETag"] = etag(version)
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
    admin: Admin,
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
    config, version = await admin.patch_config(world_id, patch, if_match)
    response.headers["ETag"] = etag(version)
    return config


async def _pause(admin: WorldAdmin, world_id: int, paused: bool, response: Response) -> PauseResponse:
    world_time, version = await admin.set_paused(world_id, paused)
    response.headers["ETag"] = etag(version)
    return PauseResponse(world_id=world_id, paused=paused, world_time=world_time)


@v1.post(
    "/worlds/{world_id}/scheduler/pause",
    response_model=PauseResponse,
    summary="Pause (idempotent)",
    responses=_STORED_ROW_INVALID,
)
async def pause(admin: Admin, world_id: WorldId, response: Response) -> PauseResponse:
    """Freeze the world's clock (``pauseSimulation: true``, persisted)."""
    return await _pause(admin, world_id, True, response)


@v1.post(
    "/worlds/{world_id}/scheduler/resume",
    response_model=PauseResponse,
    summary="Resume (idempotent)",
    responses=_STORED_ROW_INVALID,
)
async def resume(admin: Admin, world_id: WorldId, response: Response) -> PauseResponse:
    """Let the world's clock run again; resuming never jumps."""
    return await _pause(admin, world_id, False, response)


@v1.post("/worlds/{world_id}/scheduler/tick", response_model=TickResponse, summary="Force one tick")
async def force_tick(admin: Admin, world_id: WorldId, body: TickRequest) -> TickResponse:
    """Run one extra tick now covering ``deltaSeconds`` of real time (never overlaps a regular tick)."""
    return TickResponse.of(world_id, await admin.force_tick(world_id, body.delta_seconds))


@v1.get("/worlds/{world_id}/scheduler/stats", response_model=WorldStats, summary="World stats")
async def stats(admin: Admin, world_id: WorldId) -> Any:
    """The world context's ``get_stats()`` with camelCase keys."""
    return JSONResponse(camelize(admin.stats(world_id)))


@v1.post(
    "/generation/{request_id}/complete",
    summary="Report a generation request finished",
    responses={409: {"model": Detail, "description": "The request cannot take that status"}},
)
async def complete_generation(admin: Admin, request_id: RequestId, body: CompleteRequest) -> Any:
    """For generation workers: mark a handed-out request ``succeeded`` or ``failed``."""
    return camelize(dict(await admin.finish_generation(request_id, body.status, body.error)))


@open_routes.get("/metrics", include_in_schema=False)
async def metrics(admin: Admin, request: Request) -> Response:
    answer = await admin.metrics_exposition(
        request.headers.get("accept", ""), request.headers.get("accept-encoding", "")
    )
    return Response(answer.body, headers=answer.headers())


@open_routes.get("/healthz", response_model=Health, summary="Liveness", tags=["health"])
async def healthz(admin: Admin) -> Health:
    """The process is alive and its event loop answers."""
    return Health(status="ok", loop_lag_seconds=admin.loop_lag.lag_seconds)


@open_routes.get(
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
async def readyz(admin: Admin) -> Any:
    """Database accepts writes, ticks commit, event-loop lag under the threshold; 503 otherwise."""
    ready = await admin.readiness()
    health = Health(
        status="unavailable" if ready.problems else "ok",
        loop_lag_seconds=ready.loop_lag_seconds,
        database=ready.database,
        detail="; ".join(ready.problems) or None,
    )
    if ready.problems:
        return JSONResponse(status_code=503, content=health.model_dump(by_alias=True))
    return health


# ---------------------------------------------------------------- errors
async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminError)
    return JSONResponse(status_code=exc.status, content={"detail": printable(exc.detail)})


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Echoing the input back could contain NaN (not JSON); keep loc/msg/type.
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": printable(errors)})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's "error parsing the body" (e.g. not UTF-8): a bad body is 422 here.
        return JSONResponse(status_code=422, content={"detail": "request body is not valid JSON"})
    return await http_exception_handler(request, exc)


async def _database_error(request: Request, exc: Exception) -> Response:
    # Not the client's fault and worth retrying: 503, counted.
    request.app.state.admin.metrics.db_error("admin api")
    log.error("api_database_error", path=request.url.path, error=str(exc)[:500])
    return JSONResponse(status_code=503, content={"detail": f"database unavailable: {type(exc).__name__}"})


async def _too_deep(request: Request, exc: Exception) -> Response:
    return JSONResponse(status_code=422, content={"detail": "JSON nested too deeply"})


def create_app(admin: WorldAdmin, token: TokenSource) -> FastAPI:
    """The FastAPI application over ``admin``; ``token`` gives the current admin token per request.

    Also used directly by tests through an ASGI transport.
    """
    from scheduler_daemon import __version__

    app = FastAPI(
        title="scheduler-daemon admin API",
        version=__version__,
        description=(
            "Steer the World Simulation Scheduler: list worlds, read and change a world's scheduler "
            "config, pause/resume, force a tick, read stats; bring a game's worlds, NPCs and sessions in "
            "and read NPC state back (ingest: `{world}`, `{npc}`, `{session}` are a daemon id or "
            "`ext:<externalId>`). JSON, camelCase. Every /api/v1 route needs "
            "`Authorization: Bearer <token>` when an admin token is configured. Request bodies are JSON: "
            "a body sent without a Content-Type, or as application/x-www-form-urlencoded (curl's default "
            "for -d) that parses as JSON, is read as JSON; another Content-Type is 415."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.admin = admin
    app.state.ingest = IngestAdmin.of(admin)
    app.state.token = token
    app.add_exception_handler(AdminError, _refused)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(RecursionError, _too_deep)
    app.include_router(v1)
    app.include_router(ingest_routes)
    app.include_router(open_routes)
    app.add_middleware(BodySizeLimit, limit_for=body_limit, authorized=lambda scope: carries_token(scope, token))
    return app
