"""The ingest routes under ``/api/v1/worlds``: a game's worlds, NPCs and sessions, and NPC state to read back.

Each route is a few lines calling :class:`~scheduler_daemon.ingest.IngestAdmin`;
the wire models are :mod:`scheduler_daemon.entities`' (the import files use
them too). ``{world}``, ``{npc}`` and ``{session}`` are a daemon id or
``ext:<externalId>``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.types import Scope

from scheduler_daemon.entities import (
    MAX_ID,
    MAX_TEXT,
    NpcInput,
    Session,
    SessionInput,
    TierLabel,
    WorldInput,
    WorldPatch,
)
from scheduler_daemon.http.auth import require_token
from scheduler_daemon.http.content_type import JsonBodyRoute, refuse_other_bodies
from scheduler_daemon.http.middleware import MAX_BODY_BYTES
from scheduler_daemon.http.wire import DEFAULT_PAGE_SIZE, ERRORS, MAX_PAGE_SIZE, Detail
from scheduler_daemon.ingest import MAX_NPCS_PER_REQUEST, IngestAdmin, InvalidInput, check_npc_count

#: Bodies of the ingest writes may be this large (1,000 NPCs of 2 KiB; a session's NPC lists at
#: their longest); every other route keeps 64 KiB.
MAX_INGEST_BODY_BYTES: Final = 2 * 1024 * 1024

_REF = rf"^([1-9][0-9]{{0,9}}|ext:[^/\x00-\x1f\x7f]{{1,{MAX_TEXT}}})$"
_REF_HELP = "daemon id, or ext:<externalId> (percent-encoded)"
WorldRef = Annotated[str, PathParam(pattern=_REF, description=f"The world: {_REF_HELP}")]
NpcRef = Annotated[str, PathParam(pattern=_REF, description=f"The NPC: {_REF_HELP}")]
SessionRef = Annotated[str, PathParam(pattern=_REF, description=f"The session: {_REF_HELP}")]


def _ingest(request: Request) -> IngestAdmin:
    ingest: IngestAdmin = request.app.state.ingest
    return ingest


def _no_encoded_slash(request: Request) -> None:
    # The path is decoded before routing: ext:a%2Fnpcs%2F5 would reach DELETE …/ext:a/npcs/5.
    if b"%2f" in request.scope.get("raw_path", b"").lower():
        raise InvalidInput([(("path",), "an external id cannot contain '/' (%2F)")])


Ingest = Annotated[IngestAdmin, Depends(_ingest)]
# The token first, then the path and the body's Content-Type, as on every /api/v1 route (see content_type.py).
ingest_routes = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(require_token), Depends(_no_encoded_slash), Depends(refuse_other_bodies)],
    responses=ERRORS,
    tags=["ingest"],
    route_class=JsonBodyRoute,
)


def _at_most_npcs(items: Any) -> Any:
    # Before the items are validated: an oversized batch is 413, not a 422 per item.
    if isinstance(items, list):
        check_npc_count(len(items))
    return items


NpcBatch = Annotated[list[NpcInput], BeforeValidator(_at_most_npcs)]


class NpcPageQuery(BaseModel):
    """``GET …/npcs`` query: a page of NPCs by id, of one tier or all (unknown parameters are refused)."""

    model_config = ConfigDict(extra="forbid")

    tier: TierLabel | None = Field(default=None, description="Only NPCs the daemon put in this tier")
    limit: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="NPCs per page")
    cursor: int | None = Field(default=None, ge=0, le=MAX_ID, description="nextCursor of the previous page")


class _Answer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class WorldState(_Answer):
    """A world as the daemon stores it (fields as in ``World``), values written with SQL as they are."""

    id: int
    external_id: str | None
    name: str
    simulation: Any = Field(description="The scheduler config (meta.simulation) as stored: an object when valid")
    meta: dict[str, Any] = Field(description="The world's other meta keys")
    config_version: int = Field(description="Bumped by every config change")
    world_time: float | None = Field(description="Committed world time, game seconds")
    paused: bool = Field(description="The effective pauseSimulation")


class NpcState(_Answer):
    """An NPC as the daemon stores it (fields as in ``Npc``).

    Read back as stored, so a row written badly with SQL is listed too: with
    ``problem`` saying why the daemon cannot decide it, and each unreadable
    value null.
    """

    id: int
    external_id: str | None
    name: str | None
    location: str | None
    home: str | None
    routine: str | None
    energy: float | None
    mood_valence: float | None
    mood_arousal: float | None
    state: dict[str, Any] | None
    tier: TierLabel | None = Field(description="The tier the daemon assigned")
    current_activity: str | None
    activity_started_at: float | None = Field(description="World time")
    next_decision_at: float | None = Field(description="World time of the NPC's next decision")
    last_decision_at: float | None = Field(description="World time of its last decision")
    decisions: int | None = Field(description="Decisions taken so far")
    problem: str | None = Field(description="Why the daemon cannot decide this NPC (quarantined), or null")


class NpcList(_Answer):
    """One page of NPCs by id."""

    npcs: list[NpcState]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class UpsertedNpc(_Answer):
    id: int
    external_id: str | None
    created: bool = Field(description="True: inserted; false: an existing NPC updated")


class NpcUpsertResult(_Answer):
    """The NPCs of a bulk upsert in request order, with their daemon ids."""

    npcs: list[UpsertedNpc]
    created: int
    updated: int


def body_limit(scope: Scope) -> int:
    """The body size limit of a request: :data:`MAX_INGEST_BODY_BYTES` for ingest writes, else 64 KiB."""
    path, method = scope.get("path", ""), scope.get("method", "")
    parts = path.strip("/").split("/")
    if parts[:3] != ["api", "v1", "worlds"]:
        return MAX_BODY_BYTES
    world_write = (method == "POST" and len(parts) == 3) or (method == "PATCH" and len(parts) == 4)
    npcs_write = method == "PUT" and len(parts) == 5 and parts[4] == "npcs"
    session_write = method == "PUT" and len(parts) == 6 and parts[4] == "sessions"
    return MAX_INGEST_BODY_BYTES if world_write or npcs_write or session_write else MAX_BODY_BYTES


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


_NO_CONTENT: dict[int | str, dict[str, Any]] = {204: {"description": "Done"}}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Detail, "description": "External id taken, or stored row unusable"}
}


@ingest_routes.post(
    "/worlds",
    summary="Create a world",
    status_code=201,
    responses={
        201: {"model": WorldState, "description": "Created"},
        200: {"model": WorldState, "description": "A world with this externalId and the same fields exists already"},
        409: {"model": Detail, "description": "A world with this externalId exists with different fields"},
    },
)
async def create_world(ingest: Ingest, body: WorldInput) -> Response:
    """Create a world (clock at 0). With ``externalId`` it is idempotent: the same body again answers that world."""
    world, created = await ingest.create_world(body)
    return _json(world, 201 if created else 200, {"Location": f"/api/v1/worlds/{world['id']}"})


@ingest_routes.get(
    "/worlds/{world}", summary="A world", responses={200: {"model": WorldState, "description": "The world"}}
)
async def get_world(ingest: Ingest, world: WorldRef) -> Response:
    """The world as stored: name, external id, meta, simulation config, committed world time."""
    return _json(await ingest.get_world(world))


@ingest_routes.patch(
    "/worlds/{world}",
    summary="Change a world",
    responses={200: {"model": WorldState, "description": "The world as stored now"}, **_CONFLICT},
)
async def patch_world(ingest: Ingest, world: WorldRef, patch: WorldPatch) -> Response:
    """Change name or externalId; ``meta`` and ``simulation`` merge (JSON merge patch); applied before the next tick."""
    return _json(await ingest.patch_world(world, patch))


@ingest_routes.delete("/worlds/{world}", summary="Delete a world", status_code=204, responses=_NO_CONTENT)
async def delete_world(ingest: Ingest, world: WorldRef) -> Response:
    """Delete the world with its NPCs, sessions, generation requests and chains; it stops ticking first."""
    await ingest.delete_world(world)
    return Response(status_code=204)


@ingest_routes.put(
    "/worlds/{world}/npcs",
    summary="Insert or update NPCs (bulk)",
    responses={200: {"model": NpcUpsertResult, "description": "Every NPC written, in request order"}},
)
async def put_npcs(
    ingest: Ingest,
    world: WorldRef,
    items: Annotated[
        NpcBatch,
        # No maxItems in the schema: over the limit is a 413 (which says the limit), not a 422.
        Body(description=f"At most {MAX_NPCS_PER_REQUEST} NPCs (more: 413), each with externalId or an existing id"),
    ],
) -> Response:
    """One transaction: every NPC is written, or none (422 names each bad item). Applied before the next tick."""
    return _json(await ingest.put_npcs(world, items))


@ingest_routes.get(
    "/worlds/{world}/npcs",
    summary="NPC state, a page at a time",
    responses={200: {"model": NpcList, "description": "A page of NPCs, by id"}},
)
async def list_npcs(ingest: Ingest, world: WorldRef, query: Annotated[NpcPageQuery, Query()]) -> Response:
    """What the daemon decided: tier, activity, location, energy, mood, state, next and last decision."""
    page = await ingest.npc_page(world, query.tier, query.cursor, query.limit)
    tail = json.dumps({"nextCursor": page.next_cursor}, separators=(",", ":"))
    return Response('{"npcs":[' + ",".join(page.rows) + "]," + tail[1:], media_type="application/json")


@ingest_routes.delete("/worlds/{world}/npcs/{npc}", summary="Delete an NPC", status_code=204, responses=_NO_CONTENT)
async def delete_npc(ingest: Ingest, world: WorldRef, npc: NpcRef) -> Response:
    """Delete the NPC; sessions no longer list it."""
    await ingest.delete_npc(world, npc)
    return Response(status_code=204)


@ingest_routes.put(
    "/worlds/{world}/sessions/{session}",
    summary="Open or update a session",
    responses={
        200: {"model": Session, "description": "Updated"},
        201: {"model": Session, "description": "Opened (a new ext: session)"},
        **_CONFLICT,
    },
)
async def put_session(ingest: Ingest, world: WorldRef, session: SessionRef, body: SessionInput) -> Response:
    """A player online: user, location, scene and involved NPCs (ids or external ids); tiers follow at once."""
    stored, created = await ingest.put_session(world, session, body)
    return _json(stored, 201 if created else 200)


@ingest_routes.delete(
    "/worlds/{world}/sessions/{session}", summary="Close a session", status_code=204, responses=_NO_CONTENT
)
async def close_session(ingest: Ingest, world: WorldRef, session: SessionRef) -> Response:
    """The session becomes inactive (the row stays); closing a closed session changes nothing."""
    await ingest.close_session(world, session)
    return Response(status_code=204)
