"""Test helpers: real faults injected at the database level, world builders, writes only tests make."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import text

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.models import generation_requests, scheduler_instances, sessions, worlds
from scheduler_daemon.store.repository import Store


def tier_capacities_for(counts: Mapping[Tier, int], *, session: bool = True) -> dict[str, Any]:
    """A ``tiers`` config under which :func:`add_npcs_in_tiers` yields exactly ``counts``.

    Capacities are raised to fit; the ambient tier is sized to the ambient
    count so that requested dormant NPCs overflow into dormant.
    """
    return {
        "detailed": {"maxNpcs": max(counts.get(Tier.DETAILED, 0), 20)},
        "active": {"maxNpcs": max(counts.get(Tier.ACTIVE, 0), 100)},
        "ambient": {"maxNpcs": counts.get(Tier.AMBIENT, 0) if session else 500},
        "dormant": {"maxNpcs": max(counts.get(Tier.DORMANT, 0), 5000)},
    }


async def add_npcs_in_tiers(
    store: Store, world_id: int, counts: Mapping[Tier, int], *, next_decision_at: float = 0.0, session: bool = True
) -> list[int]:
    """NPCs that the daemon's tier assignment puts in the requested tiers.

    The daemon assigns tiers from sessions, so the tiers are produced the way
    it would: detailed NPCs are in a session's scene, active ones involved with
    it, ambient ones the rest, and dormant ones overflow an ambient tier sized
    by :func:`tier_capacities_for` (they are inserted last, so they lose the id
    tie-break). Without a session every NPC is dormant. The stored ``tier``
    column already holds the requested tier.
    """
    counts = {t: n for t, n in counts.items() if n}
    if not session and set(counts) - {Tier.DORMANT}:
        raise ValueError("without a session every NPC is dormant")
    rows = []
    for tier in sorted(counts):
        rows += [
            {"name": f"{tier.label}-{i}", "tier": int(tier), "next_decision_at": next_decision_at, "home": "h"}
            for i in range(counts[tier])
        ]
    ids = await store.add_npcs(world_id, rows)
    if session:
        by_tier = [Tier(r["tier"]) for r in rows]
        await store.add_session(
            world_id,
            f"user-{world_id}",
            location="square",
            scene_npc_ids=[i for i, t in zip(ids, by_tier, strict=True) if t == Tier.DETAILED],
            involved_npc_ids=[i for i, t in zip(ids, by_tier, strict=True) if t == Tier.ACTIVE],
        )
    return ids


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
    """A world with NPCs in the given tiers (all due at ``next_decision_at``) and an active session.

    See :func:`add_npcs_in_tiers` for how the tiers are produced; capacities
    are raised to fit unless the caller sets ``tiers`` itself.
    """
    counts = {t: n for t, n in (npcs_per_tier or {}).items() if n}
    meta: dict[str, Any] = {}
    if behavior is not None:
        meta["behavior"] = behavior
    sim = dict(simulation or {})
    if counts and "tiers" not in sim:
        sim["tiers"] = tier_capacities_for(counts, session=session)
    world_id = await store.create_world(name, simulation=sim, meta=meta)
    ids = await add_npcs_in_tiers(store, world_id, counts, next_decision_at=next_decision_at, session=session)
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


async def install_commit_failure(store: Store, world_id: int) -> None:
    """Make the COMMIT of every transaction that moved one world's clock fail, in the database.

    Every statement of the tick succeeds; the check is deferred to COMMIT
    (PostgreSQL: a deferred constraint trigger that raises; SQLite: a
    deferred foreign key that a trigger violates). A grouped tick containing
    the world therefore fails as a whole, without saying which world caused it.
    """
    async with store.transaction() as conn:
        if store.dialect == "sqlite":
            await conn.execute(text("CREATE TABLE inject_commit_parent (id INTEGER PRIMARY KEY)"))
            await conn.execute(
                text(
                    "CREATE TABLE inject_commit_child (parent INTEGER "
                    "REFERENCES inject_commit_parent (id) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER inject_commit_fault AFTER UPDATE ON world_states "
                    f"WHEN NEW.world_id = {world_id} AND NEW.ticks IS NOT OLD.ticks "
                    "BEGIN INSERT INTO inject_commit_child VALUES (-1); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION inject_commit_fault_fn() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'injected commit fault'; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER inject_commit_fault AFTER UPDATE ON world_states "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    f"WHEN (NEW.world_id = {world_id} AND NEW.ticks IS DISTINCT FROM OLD.ticks) "
                    "EXECUTE FUNCTION inject_commit_fault_fn()"
                )
            )


async def drop_commit_failure(store: Store) -> None:
    """Undo :func:`install_commit_failure`."""
    async with store.transaction() as conn:
        if store.dialect == "sqlite":
            await conn.execute(text("DROP TRIGGER IF EXISTS inject_commit_fault"))
            await conn.execute(text("DROP TABLE IF EXISTS inject_commit_child"))
            await conn.execute(text("DROP TABLE IF EXISTS inject_commit_parent"))
        else:
            await conn.execute(text("DROP TRIGGER IF EXISTS inject_commit_fault ON world_states"))
            await conn.execute(text("DROP FUNCTION IF EXISTS inject_commit_fault_fn()"))


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


async def update_world_simulation(store: Store, world_id: int, new_simulation: Mapping[str, Any]) -> int:
    """Store a new ``meta["simulation"]`` (see ``Store.change_world_simulation``); returns the new version."""
    record = await store.change_world_simulation(world_id, lambda _: new_simulation)
    return record.config_version


async def set_world_meta_key(store: Store, world_id: int, key: str, value: Any) -> int:
    """Replace one top-level ``meta`` key (e.g. ``behavior``); bumps ``config_version``."""
    async with store.transaction() as conn:
        current = (await store.get_world(world_id, conn)).require_valid()
        meta = copy.deepcopy(current.meta)
        meta[key] = copy.deepcopy(value)
        version = (
            await conn.execute(
                sa.update(worlds)
                .where(worlds.c.id == world_id)
                .values(meta=meta, config_version=worlds.c.config_version + 1, updated_at=datetime.now(UTC))
                .returning(worlds.c.config_version)
            )
        ).scalar_one()
    return int(version)


async def set_session_active(store: Store, session_id: int, active: bool) -> None:
    async with store.transaction() as conn:
        await conn.execute(
            sa.update(sessions).where(sessions.c.id == session_id).values(active=active, updated_at=datetime.now(UTC))
        )


async def count_by_status(store: Store, world_id: int) -> dict[str, int]:
    """One world's generation requests per status."""
    gr = generation_requests
    async with store.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(gr.c.status, sa.func.count()).where(gr.c.world_id == world_id).group_by(gr.c.status)
            )
        ).all()
    return {str(r[0]): int(r[1]) for r in rows}


async def live_instances(store: Store, now: Callable[[], sa.ColumnElement[datetime]]) -> list[dict[str, Any]]:
    """Every instance row with whether it is live by the database clock ``now`` (what operators would see)."""
    si = scheduler_instances
    async with store.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    si.c.instance_id,
                    si.c.hostname,
                    si.c.pid,
                    si.c.heartbeat_at,
                    (si.c.expires_at > now()).label("live"),
                ).order_by(si.c.instance_id)
            )
        ).all()
    return [dict(r._mapping) for r in rows]
