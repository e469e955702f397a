"""``IngestAdmin``: a game's worlds, NPCs and sessions through the API, as domain calls.

Create, change and delete worlds; bulk-upsert and delete NPCs; open, update
and close sessions; read NPC state a page at a time. Worlds, NPCs and sessions
are addressed by daemon id or by the game's external id (``ext:<id>`` in
paths, see :mod:`scheduler_daemon.entities`). Each write is one transaction
(all or nothing) and, once committed, is applied to the running world
(:meth:`~scheduler_daemon.runner.SchedulerLoopRunner.apply_changes`) before the
call returns, so the world's next tick sees it. Refusals are
:class:`~scheduler_daemon.admin.AdminError`; nothing here knows about HTTP.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from scheduler_daemon.admin import AdminError, Conflict, NotFound, WorldAdmin
from scheduler_daemon.entities import (
    NpcInput,
    SessionInput,
    WorldInput,
    WorldPatch,
    npc_wire,
    parse_ref,
    session_wire,
    show_ref,
    world_wire,
)
from scheduler_daemon.logs import get_logger
from scheduler_daemon.loop_budget import LoopBudget
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldNotRegisteredError
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.errors import (
    EntityRowsError,
    ExternalIdTakenError,
    NpcNotFoundError,
    SessionNotFoundError,
    UnknownNpcsError,
    WorldNotFoundError,
    is_unique_violation,
)
from scheduler_daemon.store.ingest import KEEP, StoredWorld
from scheduler_daemon.store.repository import Store
from scheduler_daemon.world_config import WorldConfigError, apply_patch, merge_patch, parse_world_config

log = get_logger("scheduler_daemon.ingest")

#: Most NPCs one bulk upsert may carry (more: 413); split bigger batches into several requests.
MAX_NPCS_PER_REQUEST: Final = 1000

_T = TypeVar("_T")


class InvalidInput(AdminError):
    """Invalid input; ``detail`` lists ``{loc, msg, type}`` per failing field (``loc`` starts at body/path)."""

    status = 422

    def __init__(self, errors: Sequence[tuple[Sequence[str | int], str]]) -> None:
        super().__init__([{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in errors])


class TooLarge(AdminError):
    """More items than one request may carry."""

    status = 413


def check_npc_count(count: int) -> None:
    """Refuse a bulk upsert over :data:`MAX_NPCS_PER_REQUEST` (413, the limit in the message)."""
    if count > MAX_NPCS_PER_REQUEST:
        raise TooLarge(f"{count} NPCs in one request; at most {MAX_NPCS_PER_REQUEST} per request (split the batch)")


def _ref(text: str, where: str) -> int | str:
    try:
        return parse_ref(text)
    except ValueError as exc:
        raise InvalidInput([(("path", where), str(exc))]) from None


@dataclass(frozen=True)
class NpcStatePage:
    """One page of NPCs as JSON objects (the API's ``NpcState``), and the cursor of the next page."""

    rows: list[str]
    next_cursor: int | None


@dataclass
class IngestAdmin:
    """Domain operations of the ingest API over one daemon's store and runner."""

    store: Store
    runner: SchedulerLoopRunner
    #: The daemon's ``[defaults.simulation]``: a world's config is validated over them.
    defaults: Callable[[], Mapping[str, Any]]
    budget: LoopBudget

    @classmethod
    def of(cls, admin: WorldAdmin) -> IngestAdmin:
        """The ingest operations next to an admin service (same store, runner, defaults and loop budget)."""
        return cls(admin.store, admin.runner, lambda: admin.scheduler.defaults, admin.budget)

    # ------------------------------------------------------------ worlds
    async def get_world(self, world: str) -> dict[str, Any]:
        """One world (the API's ``World``)."""
        return self._world_wire(await self._call(self.store.world_by_ref(_ref(world, "world"))))

    async def create_world(self, body: WorldInput) -> tuple[dict[str, Any], bool]:
        """Create a world (state row at world time 0); returns it and whether it was created.

        With an ``externalId`` that exists: the same body answers that world
        (not created); a different one is a :class:`Conflict` naming the
        fields that differ, and nothing changes (``PATCH`` changes a world).
        """
        if body.simulation is not None:
            self._check_simulation(body.simulation, None)
        meta = body.full_meta()

        async def write() -> tuple[StoredWorld, bool]:
            async with self.store.transaction() as conn:
                done = await self.store.insert_world(conn, name=body.name, meta=meta, external_id=body.external_id)
                return await self.store.world_by_ref(done.id, conn), done.created

        stored, created = await self._retrying(write)
        if not created:
            differ = [
                field
                for field, same in (
                    ("name", stored.name == body.name),
                    ("simulation", stored.meta.get("simulation") == body.simulation),
                    ("meta", {k: v for k, v in stored.meta.items() if k != "simulation"} == body.meta),
                )
                if not same or stored.problem is not None
            ]
            if differ:
                raise Conflict(
                    f"world ext:{body.external_id} exists (id {stored.id}) with a different {', '.join(differ)}; "
                    f"change it with PATCH /api/v1/worlds/ext:{body.external_id}"
                )
        else:
            log.info("world_created_via_api", world_id=stored.id, external_id=body.external_id)
        await self.runner.apply_changes([stored.id])
        return self._world_wire(stored), created

    async def patch_world(self, world: str, patch: WorldPatch) -> dict[str, Any]:
        """Change a world's name, external id, ``meta`` and ``simulation`` (merge patches, validated).

        A ``simulation`` that pauses the world commits its clock before answering (``freeze_paused``).
        """
        ref = _ref(world, "world")

        async def write() -> StoredWorld:
            async with self.store.transaction() as conn:
                current = await self.store.world_by_ref(ref, conn, for_update=True)
                return await self.store.update_world(
                    conn,
                    current.id,
                    name=patch.name,
                    meta=self._patched_meta(current, patch),
                    external_id=patch.external_id if "external_id" in patch.model_fields_set else KEEP,
                )

        stored = await self._call(self._retrying(write))
        await self.runner.apply_changes([stored.id])
        if patch.simulation is not None:
            # A pause by PATCH takes effect before it answers, as the admin API's pause does
            # (a no-op unless the world is paused here with game time to commit).
            with contextlib.suppress(WorldNotRegisteredError):
                await self.runner.freeze_paused(stored.id)
        return self._world_wire(stored)

    async def delete_world(self, world: str) -> None:
        """Delete a world and everything it owns; the daemon stops ticking it before this returns."""

        world_id = await self._call(self.store.resolve_world(_ref(world, "world")))

        async def write() -> None:
            async with self.store.transaction() as conn:
                if not await self.store.delete_world(conn, world_id):
                    raise WorldNotFoundError(world_id)  # deleted meanwhile

        async with self.runner.deleting(world_id):
            await self._call(write())
        log.info("world_deleted_via_api", world_id=world_id)
        await self.runner.apply_changes([world_id])

    # -------------------------------------------------------------- NPCs
    async def put_npcs(self, world: str, items: Sequence[NpcInput]) -> dict[str, Any]:
        """Insert or update NPCs by external id or id, all or nothing (the API's ``NpcUpsertResult``)."""
        check_npc_count(len(items))
        unkeyed = [i for i, item in enumerate(items) if item.external_id is None and item.id is None]
        if unkeyed:
            raise InvalidInput(
                [
                    (("body", i), "externalId or id is required, so that sending it again changes nothing")
                    for i in unkeyed
                ]
            )
        ref = _ref(world, "world")
        columns = [item.columns() for item in items]

        async def write() -> tuple[int, list[tuple[int, bool]]]:
            async with self.store.transaction() as conn:
                world_id = await self.store.resolve_world(ref, conn, lock=True)
                return world_id, await self.store.upsert_npcs(conn, world_id, columns)

        world_id, done = await self._call(self._retrying(write))
        await self.runner.apply_changes([world_id])
        created = sum(c for _, c in done)
        return {
            "npcs": [
                {"id": npc_id, "externalId": item.external_id, "created": c}
                for item, (npc_id, c) in zip(items, done, strict=True)
            ],
            "created": created,
            "updated": len(done) - created,
        }

    async def delete_npc(self, world: str, npc: str) -> None:
        """Delete one NPC (and take it out of the world's sessions)."""
        world_ref, npc_ref = _ref(world, "world"), _ref(npc, "npc")

        async def write() -> int:
            async with self.store.transaction() as conn:
                world_id = await self.store.resolve_world(world_ref, conn, lock=True)
                await self.store.delete_npc(conn, world_id, await self.store.resolve_npc(conn, world_id, npc_ref))
                return world_id

        await self.runner.apply_changes([await self._call(write())])

    async def npc_page(self, world: str, tier: str | None, cursor: int | None, limit: int) -> NpcStatePage:
        """NPCs of a world (of one tier) with ids above ``cursor``, every field, encoded under the loop budget."""
        world_id = await self._call(self.store.resolve_world(_ref(world, "world")))
        page = await self.store.npc_page(
            world_id, tier=None if tier is None else Tier.from_label(tier), after=cursor, limit=limit
        )
        rows = await self.budget.map(page.rows, lambda row: json.dumps(npc_wire(row)))
        return NpcStatePage(rows, page.next_cursor)

    # ---------------------------------------------------------- sessions
    async def put_session(self, world: str, session: str, body: SessionInput) -> tuple[dict[str, Any], bool]:
        """Open or update a session (``ext:`` creates it when new; a daemon id must exist); returns it and created."""
        world_ref, session_ref = _ref(world, "world"), _ref(session, "session")
        columns = {**body.columns(), ("id" if isinstance(session_ref, int) else "external_id"): session_ref}

        async def write() -> tuple[int, dict[str, Any], bool]:
            async with self.store.transaction() as conn:
                world_id = await self.store.resolve_world(world_ref, conn, lock=True)
                done = await self.store.upsert_session(conn, world_id, columns)
                [row] = await self.store.world_sessions(world_id, conn, ids=[done.id])
                return world_id, row, done.created

        try:
            world_id, row, created = await self._call(self._retrying(write))
        except UnknownNpcsError as exc:
            raise InvalidInput(_unknown_npc_locations(exc, body)) from None
        await self.runner.apply_changes([world_id])
        return session_wire(row), created

    async def close_session(self, world: str, session: str) -> None:
        """Close a session (kept as inactive; closing a closed one changes nothing)."""
        world_ref, session_ref = _ref(world, "world"), _ref(session, "session")

        async def write() -> int:
            async with self.store.transaction() as conn:
                world_id = await self.store.resolve_world(world_ref, conn, lock=True)
                session_id = await self.store.resolve_session(conn, world_id, session_ref)
                await self.store.close_session(conn, world_id, session_id)
                return world_id

        await self.runner.apply_changes([await self._call(write())])

    # ------------------------------------------------------------ helpers
    async def _call(self, work: Awaitable[_T]) -> _T:
        """Await store work, its refusals as admin errors (404, 409, 422)."""
        try:
            return await work
        except (WorldNotFoundError, NpcNotFoundError, SessionNotFoundError) as exc:
            raise NotFound(str(exc)) from None
        except ExternalIdTakenError as exc:
            raise Conflict(str(exc)) from None
        except EntityRowsError as exc:
            raise InvalidInput([(("body", i, field), msg) for i, field, msg in exc.problems]) from None

    @staticmethod
    async def _retrying(write: Callable[[], Awaitable[_T]]) -> _T:
        """Run a write transaction; once more if another writer inserted the same external id meanwhile."""
        try:
            return await write()
        except Exception as exc:
            if not is_unique_violation(exc):
                raise
        return await write()  # now finds the other writer's row

    def _check_simulation(self, simulation: Mapping[str, Any], world_id: int | None) -> None:
        try:
            parse_world_config(simulation, world_id=world_id, defaults=self.defaults())
        except WorldConfigError as exc:
            raise InvalidInput([(("body", "simulation", *_path(loc)), msg) for loc, msg in exc.errors]) from None

    def _patched_meta(self, current: StoredWorld, patch: WorldPatch) -> dict[str, Any] | None:
        """The world's new ``meta`` after the patch's ``meta`` and ``simulation`` merges, validated; None: unchanged."""
        if patch.meta is None and patch.simulation is None:
            return None
        if current.problem is not None:
            raise Conflict(f"world {current.id}: {current.problem}; fix the stored row first")
        meta = {k: v for k, v in current.meta.items() if k != "simulation"}
        if patch.meta is not None:
            meta = merge_patch(meta, patch.meta)
        simulation = current.meta.get("simulation")
        if patch.simulation is not None:
            base = simulation if isinstance(simulation, Mapping) else {}
            try:
                simulation, _ = apply_patch(base, patch.simulation, world_id=current.id, defaults=self.defaults())
            except WorldConfigError as exc:
                raise InvalidInput([(("body", "simulation", *_path(loc)), msg) for loc, msg in exc.errors]) from None
        return meta if simulation is None else {**meta, "simulation": simulation}

    def _world_wire(self, world: StoredWorld) -> dict[str, Any]:
        try:
            simulation = world.meta.get("simulation")
            paused = parse_world_config(simulation, defaults=self.defaults()).pause_simulation
        except WorldConfigError:
            paused = False  # an invalid config does not run: isolated, not paused
        return world_wire(
            world.id,
            external_id=world.external_id,
            name=world.name,
            meta=world.meta,
            config_version=world.config_version,
            world_time=world.world_time,
            paused=paused,
        )


def _path(loc: str) -> list[str]:
    return [p for p in loc.split(".") if p]


def _unknown_npc_locations(exc: UnknownNpcsError, body: SessionInput) -> list[tuple[Sequence[str | int], str]]:
    """Where each NPC reference that does not exist stands in the body."""
    missing = set(exc.refs)
    out: list[tuple[Sequence[str | int], str]] = []
    for field, refs in (("sceneNpcIds", body.scene_npc_ids), ("involvedNpcIds", body.involved_npc_ids)):
        out += [
            (("body", field, i), f"NPC {show_ref(ref)} does not exist in world {exc.world_id}")
            for i, ref in enumerate(refs)
            if ref in missing
        ]
    return out
