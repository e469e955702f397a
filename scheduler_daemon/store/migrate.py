"""Apply and check Alembic migrations through our own engine."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler_daemon.store.database import begin_writing
from scheduler_daemon.store.errors import SchemaNotMigratedError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


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


async def upgrade(engine: AsyncEngine, revision: str = "heads") -> tuple[set[str], set[str]]:
    """Upgrade the schema; returns (revisions before, revisions after)."""

    def run(conn: Connection) -> tuple[set[str], set[str]]:
        before = _current(conn)
        command.upgrade(_alembic_config(conn), revision)
        return before, _current(conn)

    async with begin_writing(engine) as conn:
        return await conn.run_sync(run)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaNotMigratedError` unless the schema is at this package's head."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    expected = head_revisions()
    if current != expected:
        state = "not initialised" if not current else f"at revision {', '.join(sorted(current))}"
        raise SchemaNotMigratedError(
            f"database schema is {state}, expected {', '.join(sorted(expected))}; "
            "run `scheduler-daemon db upgrade --config PATH` first"
        )
