"""Test helpers: real faults injected at the database level, world builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store


async def make_world(
    store: Store,
    *,
    name: str = "w",
    simulation: dict[str, Any] | None = None,
    npcs_per_tier: dict[Tier, int] | None = None,
    next_decision_at: float = 0.0,
    behavior: Any = None,
    session: bool = True,
) -> tuple[int, list[int]]:
    """A world with NPCs in the given tiers (all due at ``next_decision_at``) and an active session."""
    meta: dict[str, Any] = {}
    if behavior is not None:
        meta["behavior"] = behavior
    world_id = await store.create_world(name, simulation=simulation or {}, meta=meta)
    rows = []
    for tier, count in (npcs_per_tier or {}).items():
        rows += [
            {"name": f"{tier.label}-{i}", "tier": int(tier), "next_decision_at": next_decision_at, "home": "h"}
            for i in range(count)
        ]
    ids = await store.add_npcs(world_id, rows)
    if session:
        await store.add_session(world_id, f"user-{world_id}", location="square")
    return world_id, ids


async def install_failing_trigger(store: Store, table: str, world_id: int, *, name: str = "inject_fault") -> None:
    """Make every UPDATE of ``table`` rows of one world fail inside the database.

    A real fault at commit time (the transaction aborts in the server), not a
    mock: NPC updates written earlier in the same transaction must roll back.
    """
    async with store.transaction() as conn:
        if store.dialect == "sqlite":
            await conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} "
                    f"WHEN OLD.{'world_id'} = {world_id} "
                    "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
                )
            )
        else:
            await conn.execute(
                text(
                    f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW "
                    f"WHEN (OLD.world_id = {world_id}) EXECUTE FUNCTION {name}_fn()"
                )
            )


async def drop_trigger(store: Store, table: str, *, name: str = "inject_fault") -> None:
    async with store.transaction() as conn:
        if store.dialect == "sqlite":
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
        else:
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {table}"))
            await conn.execute(text(f"DROP FUNCTION IF EXISTS {name}_fn()"))


async def npc_rows(store: Store, world_id: int) -> Sequence[Any]:
    async with store.engine.connect() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT id, tier, next_decision_at, decisions, last_decision_at, energy, current_activity "
                    "FROM npcs WHERE world_id = :w ORDER BY id"
                ),
                {"w": world_id},
            )
        ).all()


async def world_state(store: Store, world_id: int) -> tuple[float, int]:
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(text("SELECT world_time, ticks FROM world_states WHERE world_id = :w"), {"w": world_id})
        ).one()
    return float(row[0]), int(row[1])
