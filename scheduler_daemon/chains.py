"""Interaction chains and cooldowns: the Python API for game code.

Everything here is in world (game) time. Without an explicit ``world_time``
the world's last committed time is used; it trails a running world by at
most one tick. Embedders holding a :class:`~scheduler_daemon.WorldScheduler`
can pass ``scheduler.get_context(world_id).current_world_time``.

::

    from scheduler_daemon.chains import start_chain, step, wait_hours, wait_minutes

    await start_chain(store, world_id, [step(wait_minutes(30), {"line": "hello"}),
                                        step(wait_hours(2), {"line": "goodbye"})],
                      chain_key="greeting", session_id=sid, npc_id=npc)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler_daemon.simulation import chains as ch
from scheduler_daemon.simulation.chains import (
    ChainError,
    ChainStep,
    on_cooldown,
    step,
    wait_days,
    wait_hours,
    wait_minutes,
    wait_seconds,
)
from scheduler_daemon.store.chains import ChainRecord
from scheduler_daemon.store.errors import ChainNotFoundError, SessionNotFoundError, WorldNotFoundError
from scheduler_daemon.store.repository import Store

__all__ = [
    "ChainError",
    "ChainNotFoundError",
    "ChainRecord",
    "ChainStep",
    "SessionNotFoundError",
    "WorldNotFoundError",
    "cancel_chain",
    "get_chain",
    "is_on_cooldown",
    "last_interaction_at",
    "list_chains",
    "on_cooldown",
    "record_interaction",
    "start_chain",
    "step",
    "wait_days",
    "wait_hours",
    "wait_minutes",
    "wait_seconds",
]


def _world_time_arg(world_time: float | None) -> float | None:
    if world_time is None:
        return None
    if isinstance(world_time, bool) or not isinstance(world_time, int | float) or not world_time >= 0:
        raise ChainError(f"world_time: expected a finite world time >= 0, got {world_time!r}")
    if world_time == float("inf"):
        raise ChainError("world_time: must be finite")
    return float(world_time)


def _optional_id(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChainError(f"{name}: expected an integer or None, got {value!r}")
    return value


async def _now(conn: Any, store: Store, world_id: int, world_time: float | None) -> float:
    await store.get_world(world_id, conn)  # WorldNotFoundError names the world
    if world_time is not None:
        return world_time
    committed = await store.committed_world_time(conn, world_id)
    return committed if committed is not None else 0.0


async def start_chain(
    store: Store,
    world_id: int,
    steps: Sequence[ChainStep | dict[str, Any]],
    *,
    chain_key: str,
    session_id: int | None = None,
    npc_id: int | None = None,
    world_time: float | None = None,
) -> int:
    """Start an interaction chain at ``world_time`` (default: the committed world time); returns its id.

    Step ``i`` fires ``steps[i].wait`` game seconds after step ``i-1`` (the
    first after the start). Raises :class:`ChainError` (empty steps, negative
    wait, bad payload or key), :class:`WorldNotFoundError` or
    :class:`SessionNotFoundError`; nothing is written then.
    """
    parsed = ch.parse_steps(steps)
    key = ch.validate_key(chain_key)
    session_id = _optional_id(session_id, "session_id")
    npc_id = _optional_id(npc_id, "npc_id")
    at = _world_time_arg(world_time)
    async with store.transaction() as conn:
        now = await _now(conn, store, world_id, at)
        if session_id is not None:
            await store.session_user(conn, world_id, session_id)
        return await store.insert_chain(
            conn, world_id=world_id, session_id=session_id, npc_id=npc_id, chain_key=key, steps=parsed, started_at=now
        )


async def cancel_chain(store: Store, chain_id: int) -> bool:
    """Cancel an active chain (no further steps fire); False if it had already ended."""
    async with store.transaction() as conn:
        await store.get_chain(conn, chain_id)
        return await store.cancel_chain(conn, chain_id)


async def get_chain(store: Store, chain_id: int) -> ChainRecord:
    """One chain with its fired steps; raises :class:`ChainNotFoundError`."""
    async with store.connect() as conn:
        return await store.get_chain(conn, chain_id)


async def list_chains(
    store: Store, *, world_id: int | None = None, status: str | None = None, limit: int = 100
) -> list[ChainRecord]:
    """Chains by id, optionally of one world and/or one status."""
    if status is not None and status not in ch.STATUSES:
        raise ValueError(f"status: expected one of {', '.join(ch.STATUSES)}, got {status!r}")
    async with store.connect() as conn:
        return await store.list_chains(conn, world_id=world_id, status=status, limit=limit)


async def record_interaction(
    store: Store, world_id: int, session_id: int, npc_id: int, key: str, *, world_time: float | None = None
) -> float:
    """Store ``lastInteractionAt`` (world time) for this session, NPC and interaction; returns it."""
    key = ch.validate_key(key, "key")
    at = _world_time_arg(world_time)
    if isinstance(npc_id, bool) or not isinstance(npc_id, int):
        raise ChainError(f"npc_id: expected an integer, got {npc_id!r}")
    async with store.transaction() as conn:
        now = await _now(conn, store, world_id, at)
        await store.session_user(conn, world_id, session_id)
        await store.upsert_interaction(conn, world_id, session_id, npc_id, key, now)
    return now


async def last_interaction_at(store: Store, world_id: int, session_id: int, npc_id: int, key: str) -> float | None:
    """``lastInteractionAt`` in world time, or None if it never happened."""
    async with store.connect() as conn:
        return await store.last_interaction_at(conn, world_id, session_id, npc_id, key)


async def is_on_cooldown(
    store: Store,
    world_id: int,
    session_id: int,
    npc_id: int,
    key: str,
    cooldown_seconds: float,
    *,
    world_time: float | None = None,
) -> bool:
    """Whether the interaction happened less than ``cooldown_seconds`` game seconds ago (world time)."""
    at = _world_time_arg(world_time)
    async with store.connect() as conn:
        now = await _now(conn, store, world_id, at)
        last = await store.last_interaction_at(conn, world_id, session_id, npc_id, key)
    return on_cooldown(last, cooldown_seconds, now)
