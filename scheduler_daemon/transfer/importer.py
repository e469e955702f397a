"""Importing a file: each world validated, then written in a transaction of its own, upserted by external id.

A rejected world (undecodable, invalid, naming NPCs that do not exist)
commits nothing and is reported with its line and field paths; the next
world goes on. A dry run runs each world's transaction to the end, then rolls
it back, so it reports exactly what the import would do.

Matching: a world, NPC or session with an ``externalId`` that exists (NPCs
and sessions: in that world) is updated, anything else is created. Daemon
ids in a file (``id``) are never matched against the database, since a file
moves between databases: an NPC's ``id`` only names it for the integer
references in the same world's sessions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy.exc as sa_exc
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.progress import ProgressBar
from scheduler_daemon.retry import retry_transient
from scheduler_daemon.store.base import MAX_NPC_STATE_BYTES, MAX_WORLD_META_BYTES
from scheduler_daemon.store.errors import EntityRowsError, UnknownNpcsError, is_unique_violation
from scheduler_daemon.transfer.files import Entry, ImportFile
from scheduler_daemon.transfer.report import ImportSummary, WorldCounts, WorldFailure, validation_problems
from scheduler_daemon.transfer.schema import FileWorld
from scheduler_daemon.world_config import WorldConfigError, parse_world_config

if TYPE_CHECKING:
    from scheduler_daemon.store.repository import Store

#: Attempts at a world's transaction when the database error is transient (see :func:`retry_transient`).
WORLD_ATTEMPTS: Final = 5


class RejectedWorld(Exception):
    """A world that cannot be imported as given; ``problems`` are ``path: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ImportInterrupted(Exception):
    """A database error that is no world's fault and outlasted the world's retries (the connection lost).

    ``summary`` counts the worlds committed before it; the world being written
    was rolled back and the rest were not tried.
    """

    def __init__(self, summary: ImportSummary, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.summary = summary


class _RolledBack(Exception):
    """Ends a dry run's transaction after its last statement, carrying what it did."""

    def __init__(self, counts: WorldCounts) -> None:
        super().__init__("dry run")
        self.counts = counts


def _shown_refs(refs: Iterable[int | str]) -> str:
    # As the file writes them: 12 for an id, "bob" for an external id.
    return ", ".join(json.dumps(r, ensure_ascii=False) for r in refs)


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _duplicates(path: str, keys: Sequence[int | str | None], what: str) -> list[str]:
    seen: dict[int | str, int] = {}
    problems = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in seen:
            problems.append(f"{path}[{i}].{what}: {json.dumps(key)} is also {path.rpartition('.')[2]}[{seen[key]}]'s")
        else:
            seen[key] = i
    return problems


def _check_world(index: int, world: FileWorld, defaults: Mapping[str, Any]) -> list[str]:
    """What the models cannot see: the scheduler config, stored sizes, keys given twice within the world."""
    at = f"worlds[{index}]"
    problems: list[str] = []
    if world.simulation is not None:
        try:
            parse_world_config(world.simulation, defaults=defaults)
        except WorldConfigError as exc:
            problems += [f"{at}.simulation{'.' + loc if loc else ''}: {msg}" for loc, msg in exc.errors]
    if (size := _json_size(world.full_meta())) > MAX_WORLD_META_BYTES:
        problems.append(f"{at}.meta: {size} bytes with simulation, over the limit of {MAX_WORLD_META_BYTES}")
    for i, npc in enumerate(world.npcs):
        if (size := _json_size(npc.state)) > MAX_NPC_STATE_BYTES:
            problems.append(f"{at}.npcs[{i}].state: {size} bytes, over the limit of {MAX_NPC_STATE_BYTES}")
    problems += _duplicates(f"{at}.npcs", [n.external_id for n in world.npcs], "externalId")
    problems += _duplicates(f"{at}.npcs", [n.id for n in world.npcs], "id")
    problems += _duplicates(f"{at}.sessions", [s.external_id for s in world.sessions], "externalId")
    return problems


def _parse(entry: Entry, defaults: Mapping[str, Any]) -> FileWorld:
    """The entry's world, validated; :class:`RejectedWorld` with every problem's path otherwise."""
    if entry.problem is not None:
        raise RejectedWorld([f"worlds[{entry.index}]: {entry.problem}"])
    try:
        world = FileWorld.model_validate(entry.data)
    except ValidationError as exc:
        raise RejectedWorld(validation_problems(entry.index, exc)) from None
    problems = _check_world(entry.index, world, defaults)
    if problems:
        raise RejectedWorld(problems)
    return world


@dataclass(frozen=True, slots=True)
class _WrittenNpcs:
    """The daemon ids the file's NPC ``id`` labels became, and the NPCs this transaction inserted."""

    labels: dict[int, int]
    created: set[int]


async def _write_npcs(store: Store, conn: AsyncConnection, index: int, world_id: int, world: FileWorld) -> _WrittenNpcs:
    items = []
    for npc in world.npcs:
        columns = npc.columns()
        columns.pop("id", None)  # a label within the file, never a row of this database
        items.append(columns)
    try:
        written = await store.upsert_npcs(conn, world_id, items) if items else []
    except EntityRowsError as exc:
        raise RejectedWorld([f"worlds[{index}].npcs[{i}].{field}: {msg}" for i, field, msg in exc.problems]) from None
    labels = {npc.id: npc_id for npc, (npc_id, _) in zip(world.npcs, written, strict=True) if npc.id is not None}
    return _WrittenNpcs(labels, {npc_id for npc_id, created in written if created})


def _session_refs(refs: Sequence[int | str], npcs: _WrittenNpcs) -> tuple[list[int | str], list[int | str]]:
    """(references for the store, references that name nothing): labels become the NPCs' daemon ids.

    An unlabelled integer is an NPC that existed before this import; one of
    the NPCs just inserted has that id only by chance, so it names nothing.
    """
    out: list[int | str] = []
    unknown: list[int | str] = []
    for ref in refs:
        if isinstance(ref, int) and ref in npcs.labels:
            out.append(npcs.labels[ref])
        elif isinstance(ref, int) and ref in npcs.created:
            unknown.append(ref)
        else:
            out.append(ref)
    return out, unknown


async def _write_sessions(
    store: Store, conn: AsyncConnection, index: int, world_id: int, world: FileWorld, npcs: _WrittenNpcs
) -> tuple[int, int, int]:
    """Upsert the world's sessions; (created, updated, closed). Every unknown NPC reference is listed."""
    was_active = {s["external_id"]: s["active"] for s in await store.world_sessions(world_id, conn) if s["external_id"]}
    created = updated = closed = 0
    problems = []
    for k, session in enumerate(world.sessions):
        columns = session.columns()
        columns.pop("id", None)  # sessions, too, are matched by external id only
        columns["scene_npc_ids"], unknown = _session_refs(session.scene_npc_ids, npcs)
        columns["involved_npc_ids"], unknown2 = _session_refs(session.involved_npc_ids, npcs)
        missing = list(dict.fromkeys([*unknown, *unknown2]))
        try:
            if missing:  # still look the others up, to list them all
                await store.resolve_npc_refs(conn, world_id, [*columns["scene_npc_ids"], *columns["involved_npc_ids"]])
            else:
                done = await store.upsert_session(conn, world_id, columns)
                if done.created:
                    created += 1
                elif was_active.get(session.external_id) and not session.active:
                    closed += 1
                else:
                    updated += 1
        except UnknownNpcsError as exc:
            missing += [r for r in exc.refs if r not in missing]
        if missing:
            problems.append(
                f"worlds[{index}].sessions[{k}]: NPCs in neither the file nor the world: {_shown_refs(missing)}"
            )
    if problems:
        raise RejectedWorld(problems)
    return created, updated, closed


async def write_world(store: Store, conn: AsyncConnection, index: int, world: FileWorld) -> WorldCounts:
    """Upsert one world with its NPCs and sessions in the caller's transaction; :class:`RejectedWorld` if it cannot."""
    upserted = await store.upsert_world(
        conn,
        name=world.name,
        meta=world.full_meta(),
        external_id=world.external_id,
        world_time=world.world_time or 0.0,
    )
    npcs = await _write_npcs(store, conn, index, upserted.id, world)
    sessions = await _write_sessions(store, conn, index, upserted.id, world, npcs)
    return WorldCounts(
        world_created=upserted.created,
        npcs_created=len(npcs.created),
        npcs_updated=len(world.npcs) - len(npcs.created),
        sessions_created=sessions[0],
        sessions_updated=sessions[1],
        sessions_closed=sessions[2],
    )


async def _import_one(store: Store, entry: Entry, *, dry_run: bool, defaults: Mapping[str, Any]) -> WorldCounts:
    world = _parse(entry, defaults)

    async def attempt() -> WorldCounts:
        try:
            async with store.transaction() as conn:
                counts = await write_world(store, conn, entry.index, world)
                if dry_run:
                    raise _RolledBack(counts)
        except _RolledBack as rolled_back:
            return rolled_back.counts
        return counts

    try:
        # A deadlock with a running daemon's tick (the two lock NPC rows in different orders), a busy
        # SQLite file or a brief disconnect: the world's whole transaction runs again.
        return await retry_transient("world_import", attempt, max_attempts=WORLD_ATTEMPTS, line=entry.line)
    except sa_exc.IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        # The external ids of the world are distinct (checked above): another writer inserted one meanwhile.
        raise RejectedWorld(
            [f"worlds[{entry.index}]: an external id was inserted by another writer meanwhile; import again"]
        ) from None


async def import_worlds(
    store: Store, source: ImportFile, *, dry_run: bool, defaults: Mapping[str, Any], progress: ProgressBar
) -> ImportSummary:
    """Import every world of ``source`` in file order, one transaction each; the summary of what was done.

    ``defaults`` are the settings' ``[defaults.simulation]``, which a world's
    config is validated over. Rejected worlds are printed through
    ``progress`` as they happen and listed in the summary. A database error
    that is no world's fault raises :class:`ImportInterrupted`.
    """
    summary = ImportSummary(dry_run=dry_run)
    for entry in source.entries:
        try:
            summary.add(await _import_one(store, entry, dry_run=dry_run, defaults=defaults))
        except RejectedWorld as exc:
            failure = WorldFailure(entry.line, entry.index, _external_id(entry.data), exc.problems)
            summary.failures.append(failure)
            for message in failure.messages():
                progress.print(message)
        except sa_exc.SQLAlchemyError as exc:
            raise ImportInterrupted(summary, exc) from exc
        progress.update(entry.done, summary.progress_text())
    return summary


def _external_id(data: object) -> str | None:
    value = data.get("externalId") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
