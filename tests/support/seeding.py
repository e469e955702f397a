"""Databases for process tests: migrated with the CLI, seeded through the Store API, read with plain SQL."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.process.test_daemon_world_time import ROOT, _reset_pg, cli, sync_url
from tests.support.helpers import make_world


def process_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment of a child process: only our database URL among ``SCHEDULER_*``; the checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(SCHEDULER_DATABASE__URL=db_url, PYTHONPATH=str(ROOT), **extra)
    return env


def migrate(db_url: str) -> None:
    """An empty database migrated with ``scheduler-daemon db upgrade``."""
    _reset_pg(db_url)
    done = cli("db", "upgrade", env=process_env(db_url))
    assert done.returncode == 0, done.stderr


def seed_world(db_url: str, *, name: str = "w", simulation: dict[str, Any], npcs: int = 3, session: bool = True) -> int:
    """A world with ``npcs`` NPCs in a player's scene (an active session), created through the Store API."""

    async def create() -> int:
        store = Store.from_url(db_url)
        try:
            world_id, _ = await make_world(
                store, name=name, simulation=simulation, npcs_per_tier={Tier.DETAILED: npcs}, session=session
            )
            return world_id
        finally:
            await store.dispose()

    return asyncio.run(create())


class WorldStates:
    """``world_states`` rows read with a synchronous engine (the test's side of the database)."""

    def __init__(self, db_url: str) -> None:
        self.engine = sa.create_engine(sync_url(db_url))

    def __call__(self, world_id: int) -> tuple[float, int]:
        """(world_time, ticks)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT world_time, ticks FROM world_states WHERE world_id = :w"), {"w": world_id}
            ).one()
        return float(row[0]), int(row[1])

    def stamp(self, world_id: int) -> datetime | None:
        """``last_advanced_at`` (aware, UTC)."""
        with self.engine.connect() as conn:
            at = conn.execute(
                sa.text("SELECT last_advanced_at FROM world_states WHERE world_id = :w"), {"w": world_id}
            ).scalar_one()
        if isinstance(at, str):
            at = datetime.fromisoformat(at)
        return None if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)

    def close(self) -> None:
        self.engine.dispose()
