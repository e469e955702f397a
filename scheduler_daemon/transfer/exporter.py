"""Exporting worlds in the import format, streamed: a page of worlds, a page of NPCs at a time.

Each world is read in one snapshot (its NPCs, sessions and clock agree with
each other while the daemon keeps ticking) and written as it is read, so a
world of any size never has to be in memory whole. Sessions name their NPCs
by external id where the NPC has one, else by the daemon id the NPC's ``id``
shows in the same file, so the file imports into an empty database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Final

from scheduler_daemon.entities import npc_wire, parse_ref, session_wire
from scheduler_daemon.store.errors import WorldNotFoundError
from scheduler_daemon.transfer.files import FileFormat, WorldWriter

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from scheduler_daemon.store.ingest import StoredWorld
    from scheduler_daemon.store.repository import Store

#: Worlds listed per query when every world is exported.
WORLDS_PER_PAGE: Final = 100
#: NPCs read per query; at most this many are in memory at once.
NPCS_PER_PAGE: Final = 1000


class ExportRefError(ValueError):
    """A ``--world`` reference that is malformed or names no world (nothing was written)."""


@dataclass(slots=True)
class ExportCounts:
    """What an export wrote, and the warnings about what it could not write faithfully."""

    worlds: int = 0
    npcs: int = 0
    sessions: int = 0
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        return f"{self.worlds} worlds, {self.npcs} NPCs, {self.sessions} sessions"


async def resolve_worlds(store: Store, refs: Sequence[str]) -> list[int]:
    """The daemon ids of ``--world`` references (``12`` or ``ext:<externalId>``), in the order given, once each."""
    ids: list[int] = []
    for text in refs:
        try:
            world_id = await store.resolve_world(parse_ref(text))
        except ValueError as exc:
            raise ExportRefError(f"--world {text}: {exc}") from None
        except WorldNotFoundError as exc:
            raise ExportRefError(f"--world {text}: {exc}") from None
        if world_id not in ids:
            ids.append(world_id)
    return ids


async def _world_ids(store: Store, world_ids: Sequence[int] | None) -> AsyncIterator[int]:
    """The given worlds, or every world by id, a page at a time (each world is read again in its snapshot)."""
    if world_ids is not None:
        for world_id in world_ids:
            yield world_id
        return
    after = None
    while page := await store.worlds_after(after, WORLDS_PER_PAGE):
        for world in page:
            yield world.id
        after = page[-1].id


def _world_fields(world: StoredWorld) -> dict[str, Any]:
    """What a world is, in the file's keys; not the daemon's bookkeeping (``configVersion``, ``paused``)."""
    meta = dict(world.meta)
    simulation = meta.pop("simulation", None)
    return {
        "id": world.id,
        "externalId": world.external_id,
        "name": world.name,
        "simulation": simulation,
        "meta": meta,
        "worldTime": world.world_time,
    }


async def _write_world(store: Store, conn: AsyncConnection, world: StoredWorld, out: WorldWriter) -> ExportCounts:
    """One world, its NPCs a page at a time, then its sessions; what was written."""
    counts = ExportCounts(worlds=1)
    sessions = await store.world_sessions(world.id, conn)
    referenced = {i for s in sessions for i in (*s["scene_npc_ids"], *s["involved_npc_ids"])}
    # Only for the NPCs sessions name: a world of a million NPCs keeps a few entries here.
    refs: dict[int, int | str] = {}
    out.begin_world(_world_fields(world))
    out.begin_list("npcs")
    after = None
    quarantined: list[str] = []
    while True:
        page = await store.npc_page(world.id, after=after, limit=NPCS_PER_PAGE, conn=conn)
        for row in page.rows:
            wire = npc_wire(row)
            if wire["problem"] is None:
                del wire["problem"]  # read-only; present only to say why values are null
            else:
                quarantined.append(f"NPC {row['id']}: {wire['problem']}")
            if row["id"] in referenced:
                refs[row["id"]] = row["external_id"] or row["id"]
            out.item(wire)
        counts.npcs += len(page.rows)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    if quarantined:
        counts.warnings.append(
            f"world {world.id}: {len(quarantined)} quarantined NPCs written with their unreadable values as null, "
            f"which an import refuses until fixed (first: {quarantined[0]})"
        )
    out.begin_list("sessions")
    for session in sessions:
        wire = session_wire(session)
        for key in ("sceneNpcIds", "involvedNpcIds"):
            gone = [i for i in wire[key] if i not in refs]
            if gone:
                shown = ", ".join(map(str, gone))
                counts.warnings.append(
                    f"world {world.id}: session {session['id']} names deleted NPCs ({shown}): left out"
                )
            wire[key] = [refs[i] for i in wire[key] if i in refs]
        out.item(wire)
    counts.sessions = len(sessions)
    out.end_world()
    return counts


async def export_worlds(store: Store, world_ids: Sequence[int] | None, out: IO[str], fmt: FileFormat) -> ExportCounts:
    """Write the given worlds (``None``: every world, by id) to ``out`` in ``fmt``; what was written.

    A world whose stored row cannot be read (its ``meta``) is left out with a
    warning; one deleted while the export runs is left out silently.
    """
    total = ExportCounts()
    writer = WorldWriter(out, fmt)
    async for world_id in _world_ids(store, world_ids):
        async with store.snapshot() as conn:
            try:
                world = await store.world_by_ref(world_id, conn)
            except WorldNotFoundError:
                continue
            if world.problem is not None:
                total.warnings.append(f"world {world_id} left out: {world.problem}")
                continue
            counts = await _write_world(store, conn, world, writer)
        total.worlds += 1
        total.npcs += counts.npcs
        total.sessions += counts.sessions
        total.warnings += counts.warnings
    writer.close()
    return total
