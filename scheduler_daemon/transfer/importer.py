"""Importing a file: each world validated, then written in a transaction of its own, upserted by external id.

A rejected world (undecodable, invalid, naming NPCs that do not exist)
commits nothing and is reported with its line and field paths; the next
world goes on. A dry run runs each world's transaction to the end, then rolls
it back, so it reports exactly what the import would do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from scheduler_daemon.transfer.files import Entry, ImportFile
from scheduler_daemon.transfer.progress import ProgressBar
from scheduler_daemon.transfer.report import ImportSummary, WorldCounts, WorldFailure, validation_problems
from scheduler_daemon.transfer.schema import FileWorld

if TYPE_CHECKING:
    from scheduler_daemon.store.repository import Store


class _RolledBack(Exception):
    """Ends a dry run's transaction after its last statement, carrying what it did."""

    def __init__(self, counts: WorldCounts) -> None:
        super().__init__("dry run")
        self.counts = counts


class RejectedWorld(Exception):
    """A world that cannot be imported as given; ``problems`` are ``path: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _external_id(data: object) -> str | None:
    value = data.get("externalId") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _parse(entry: Entry) -> FileWorld:
    """The entry's world, validated; :class:`RejectedWorld` with every problem's path otherwise."""
    if entry.problem is not None:
        raise RejectedWorld([f"worlds[{entry.index}]: {entry.problem}"])
    try:
        return FileWorld.model_validate(entry.data)
    except ValidationError as exc:
        raise RejectedWorld(validation_problems(entry.index, exc)) from None


async def _import_one(store: Store, entry: Entry, *, dry_run: bool) -> WorldCounts:
    world = _parse(entry)
    try:
        async with store.transaction() as conn:
            counts = await write_world(store, conn, entry.index, world)
            if dry_run:
                raise _RolledBack(counts)
    except _RolledBack as rolled_back:
        return rolled_back.counts
    return counts


async def import_worlds(store: Store, source: ImportFile, *, dry_run: bool, progress: ProgressBar) -> ImportSummary:
    """Import every world of ``source`` in file order, one transaction each; the summary of what was done.

    Rejected worlds are printed through ``progress`` as they happen and
    listed in the summary. Database errors other than a world's own (the
    connection lost) propagate: the worlds before are committed, the rest not tried.
    """
    summary = ImportSummary(dry_run=dry_run)
    for entry in source.entries:
        try:
            summary.add(await _import_one(store, entry, dry_run=dry_run))
        except RejectedWorld as exc:
            failure = WorldFailure(entry.line, entry.index, _external_id(entry.data), exc.problems)
            summary.failures.append(failure)
            for message in failure.messages():
                progress.print(message)
        progress.update(entry.done, summary.progress_text())
    return summary
