"""Apply and check Alembic migrations through our own engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler_daemon.store.database import begin_writing
from scheduler_daemon.store.errors import SchemaNotMigratedError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: ``progress(done, total, revision)``: one more migration of ``total`` pending was applied.
MigrationProgress: TypeAlias = Callable[[int, int, str], None]


def _alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revisions() -> set[str]:
    """The revisions this version of the package expects."""
    return set(ScriptDirectory.from_config(_alembic_config()).get_heads())


def _current(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def _refuse_unknown(script: ScriptDirectory, current: set[str]) -> None:
    """Raise :class:`SchemaNotMigratedError` if ``current`` has a revision this package does not ship."""
    unknown = current - {rev.revision for rev in script.walk_revisions()}
    if unknown:
        raise SchemaNotMigratedError(
            f"database schema is at revision {', '.join(sorted(unknown))}, which this version of scheduler-daemon "
            f"does not know (its latest is {', '.join(sorted(script.get_heads()))}): a newer version migrated it; "
            "run that version, or restore the database from before"
        )


def _pending(script: ScriptDirectory, current: set[str]) -> int:
    """How many revisions up to the heads are not yet applied."""
    applied = {rev.revision for head in current for rev in script.iterate_revisions(head, "base")}
    return sum(1 for rev in script.walk_revisions() if rev.revision not in applied)


async def upgrade(
    engine: AsyncEngine, revision: str = "heads", *, progress: MigrationProgress | None = None
) -> tuple[set[str], set[str]]:
    """Upgrade the schema; returns (revisions before, revisions after).

    ``progress`` is called after each migration applied (see :data:`MigrationProgress`).
    """

    def run(conn: Connection) -> tuple[set[str], set[str]]:
        before = _current(conn)
        cfg = _alembic_config(conn)
        script = ScriptDirectory.from_config(cfg)
        _refuse_unknown(script, before)
        if progress is not None:
            total = _pending(script, before)
            done = 0

            def applied(*, step: Any, **_: Any) -> None:
                nonlocal done
                done += 1
                progress(done, total, step.up_revision_id or "")

            # Read by migrations/env.py, handed to alembic's context.configure.
            cfg.attributes["on_version_apply"] = [applied]
        command.upgrade(cfg, revision)
        return before, _current(conn)

    async with begin_writing(engine) as conn:
        return await conn.run_sync(run)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaNotMigratedError` unless the schema is at this package's head."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    _refuse_unknown(ScriptDirectory.from_config(_alembic_config()), current)
    expected = head_revisions()
    if current != expected:
        state = "not initialised" if not current else f"at revision {', '.join(sorted(current))}"
        raise SchemaNotMigratedError(
            f"database schema is {state}, expected {', '.join(sorted(expected))}; "
            "run `scheduler-daemon db upgrade --config PATH` first"
        )
