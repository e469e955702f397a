"""What an import did (or would do, dry): counts, rejected worlds with their lines and fields, and how it is shown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

#: Problems listed per rejected world; the rest are counted.
MAX_PROBLEMS_SHOWN: Final = 20


def field_path(index: int, loc: Iterable[int | str]) -> str:
    """``worlds[3].npcs[12].energy`` from a world's position in the file and a location inside it."""
    path = f"worlds[{index}]"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _message(error: ErrorDetails) -> str:
    if error["type"] == "model_type":  # "… or instance of Npc" means nothing in a file
        return "Input should be a JSON object"
    return error["msg"].removeprefix("Value error, ")


def validation_problems(index: int, exc: ValidationError) -> list[str]:
    """One ``path: message`` per error of a world's validation, paths in the file's camelCase keys."""
    return [f"{field_path(index, e['loc'])}: {_message(e)}" for e in exc.errors(include_url=False)]


@dataclass(frozen=True, slots=True)
class WorldFailure:
    """A rejected world: where it starts in the file, its position and external id, and every problem found."""

    line: int
    index: int
    external_id: str | None
    problems: Sequence[str]

    def messages(self) -> list[str]:
        """``line 7: worlds[3].npcs[12].energy: Input should be a valid number`` lines (at most 20, then a count)."""
        out = [f"line {self.line}: {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        if len(self.problems) > MAX_PROBLEMS_SHOWN:
            more = len(self.problems) - MAX_PROBLEMS_SHOWN
            out.append(f"line {self.line}: worlds[{self.index}]: … and {more} more problems")
        return out

    def to_wire(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "index": self.index,
            "externalId": self.external_id,
            "problems": list(self.problems),
        }


@dataclass(frozen=True, slots=True)
class WorldCounts:
    """What one world's transaction did: the world created or updated, its NPCs and sessions."""

    world_created: bool
    npcs_created: int
    npcs_updated: int
    sessions_created: int
    sessions_updated: int
    sessions_closed: int


@dataclass(slots=True)
class ImportSummary:
    """Totals of an import; with ``dry_run``, what it would have done (every transaction rolled back)."""

    dry_run: bool
    worlds_created: int = 0
    worlds_updated: int = 0
    npcs_created: int = 0
    npcs_updated: int = 0
    sessions_created: int = 0
    sessions_updated: int = 0
    sessions_closed: int = 0
    failures: list[WorldFailure] = field(default_factory=list)

    def add(self, counts: WorldCounts) -> None:
        """Count one world's successful (or, dry, successfully rolled back) transaction."""
        if counts.world_created:
            self.worlds_created += 1
        else:
            self.worlds_updated += 1
        self.npcs_created += counts.npcs_created
        self.npcs_updated += counts.npcs_updated
        self.sessions_created += counts.sessions_created
        self.sessions_updated += counts.sessions_updated
        self.sessions_closed += counts.sessions_closed

    def progress_text(self) -> str:
        """The counts the progress bar shows."""
        worlds = self.worlds_created + self.worlds_updated
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return f"{worlds} worlds, {self.npcs_created + self.npcs_updated} NPCs{failed}"

    def to_wire(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {
            "dryRun": self.dry_run,
            "worlds": {"created": self.worlds_created, "updated": self.worlds_updated, "failed": len(self.failures)},
            "npcs": {"created": self.npcs_created, "updated": self.npcs_updated},
            "sessions": {
                "created": self.sessions_created,
                "updated": self.sessions_updated,
                "closed": self.sessions_closed,
            },
            "failures": [f.to_wire() for f in self.failures],
        }

    def render(self) -> str:
        """The summary for a human, one line per kind of entity."""
        head = "dry run (every world rolled back, nothing committed):" if self.dry_run else "imported:"
        return "\n".join(
            (
                head,
                f"  worlds:   {self.worlds_created} created, {self.worlds_updated} updated, "
                f"{len(self.failures)} failed",
                f"  NPCs:     {self.npcs_created} created, {self.npcs_updated} updated",
                f"  sessions: {self.sessions_created} created, {self.sessions_updated} updated, "
                f"{self.sessions_closed} closed",
            )
        )
