"""Demo content for ``make run``: three worlds, a few hundred NPCs, sessions,
queued generation requests and interaction chains.

Idempotent: worlds are recognised by ``meta["demo"]`` and never seeded twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

from scheduler_daemon import chains, generation
from scheduler_daemon.simulation.chains import step, wait_hours, wait_minutes
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.simulation.tiers import NpcPlacement, SessionView, assign_tiers
from scheduler_daemon.store.repository import Store
from scheduler_daemon.world_config import parse_world_config

_FIRST = (
    "Ada",
    "Bram",
    "Cora",
    "Dov",
    "Edda",
    "Finn",
    "Greta",
    "Hal",
    "Ines",
    "Jory",
    "Kira",
    "Lev",
    "Mara",
    "Nils",
    "Orla",
    "Pim",
    "Quinn",
    "Rhea",
    "Sol",
    "Tove",
    "Ugo",
    "Vera",
    "Wim",
    "Xan",
    "Yara",
    "Zed",
)
_LAST = ("Ashford", "Brook", "Cole", "Dale", "Eld", "Fenn", "Gale", "Hart", "Ives", "Jarrow")
_HOMES = ("north_row", "mill_lane", "harbour_end", "old_town", "hillside")
_ROUTINES = ("villager", "villager", "villager", "merchant", "night_owl")


def _slot(days: list[str] | None, start: str, end: str, **weights: float) -> dict[str, Any]:
    slot: dict[str, Any] = {"start": start, "end": end, "activities": weights}
    if days is not None:
        slot["days"] = days
    return slot


_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]

#: Demo behaviour content (JSON shape, camelCase), e.g. for new worlds and tests.
#: Every routine covers the whole week. Treat as read-only; parse it with
#: :func:`~scheduler_daemon.simulation.behavior.parse_behavior`.
DEMO_BEHAVIOR: Final[dict[str, Any]] = {
    "activities": {
        # Slept in short chunks so waking follows the routine's night slot closely.
        "sleep": {
            "durationMinutes": [90, 150],
            "energyPerHour": 12.0,
            "moodValence": 1.0,
            "moodArousal": -6.0,
            "location": "home",
        },
        "eat": {
            "durationMinutes": [20, 45],
            "energyPerHour": 4.0,
            "moodValence": 6.0,
            "moodArousal": 1.0,
            "location": ["tavern", "home"],
            "cooldownMinutes": 180,
        },
        "work": {
            "durationMinutes": [90, 180],
            "energyPerHour": -8.0,
            "moodValence": -2.0,
            "moodArousal": 3.0,
            "location": ["workshop", "market"],
            "requirements": {"minEnergy": 20},
        },
        "socialise": {
            "durationMinutes": [30, 120],
            "energyPerHour": -3.0,
            "moodValence": 10.0,
            "moodArousal": 6.0,
            "location": ["tavern", "square"],
            "cooldownMinutes": 60,
            "requirements": {"minEnergy": 10},
        },
        "wander": {
            "durationMinutes": [20, 60],
            "energyPerHour": -2.0,
            "moodValence": 3.0,
            "moodArousal": 2.0,
            "location": ["square", "park"],
            "cooldownMinutes": 30,
            "requirements": {"minEnergy": 5},
        },
    },
    "routines": {
        "villager": {
            "slots": [
                _slot(None, "22:00", "06:00", sleep=1),
                _slot(None, "06:00", "08:00", eat=3, wander=1),
                _slot(_WEEKDAYS, "08:00", "12:00", work=5, wander=1),
                _slot(_WEEKDAYS, "12:00", "13:00", eat=4, socialise=1),
                _slot(_WEEKDAYS, "13:00", "18:00", work=5, socialise=1),
                _slot(["sat", "sun"], "08:00", "18:00", wander=3, socialise=3, eat=1),
                _slot(None, "18:00", "22:00", eat=2, socialise=3, wander=1),
            ]
        },
        "merchant": {
            "slots": [
                _slot(None, "23:00", "07:00", sleep=1),
                _slot(None, "07:00", "09:00", eat=3, wander=1),
                _slot(["mon", "tue", "wed", "thu", "fri", "sat"], "09:00", "19:00", work=6, eat=1),
                _slot(["sun"], "09:00", "19:00", wander=2, socialise=2, eat=1),
                _slot(None, "19:00", "23:00", socialise=3, eat=2),
            ]
        },
        "night_owl": {
            "slots": [
                _slot(None, "04:00", "12:00", sleep=1),
                _slot(None, "12:00", "14:00", eat=3, wander=1),
                _slot(None, "14:00", "20:00", wander=2, work=2, socialise=1),
                _slot(None, "20:00", "04:00", socialise=4, wander=2, eat=1),
            ]
        },
    },
    "defaultRoutine": "villager",
}


@dataclass(frozen=True, slots=True)
class DemoWorld:
    key: str
    name: str
    npcs: int
    simulation: dict[str, Any]
    sessions: tuple[tuple[str, str, int], ...]  # (user, location, scene size)


DEMO_WORLDS = (
    DemoWorld(
        "riverside",
        "Riverside",
        140,
        # Per-user quota 3: with no worker completing requests, the queue visibly
        # stops at 3 in flight per user (backpressure) until `jobs complete`.
        {"timeScale": 60, "tickIntervalSeconds": 1.0, "generation": {"maxInFlightPerUser": 3}},
        (("alice", "tavern", 3), ("bob", "market", 2)),
    ),
    DemoWorld(
        "harbor",
        "Harbor Town",
        110,
        {"timeScale": 600, "tickIntervalSeconds": 0.5, "maxNpcTicksPerStep": 40},
        (("carol", "square", 4),),
    ),
    DemoWorld(
        "hollow",
        "Old Hollow",
        80,
        {"timeScale": 3600, "tickIntervalSeconds": 2.0, "alwaysOn": True, "tiers": {"dormant": {"maxNpcs": 60}}},
        (),
    ),
)


async def seed_demo(store: Store, *, seed: int = 7) -> list[int]:
    """Create the demo worlds that are missing; returns the ids created."""
    existing = {w.meta.get("demo") for w in await store.list_worlds()}
    rng = random.Random(seed)
    created: list[int] = []
    for spec in DEMO_WORLDS:
        if spec.key in existing:
            continue
        config = parse_world_config(spec.simulation)  # fail loudly if the demo itself is wrong
        world_id = await store.create_world(
            spec.name, simulation=spec.simulation, meta={"demo": spec.key, "behavior": DEMO_BEHAVIOR}
        )
        rows: list[dict[str, Any]] = []
        for i in range(spec.npcs):
            home = rng.choice(_HOMES)
            rows.append(
                {
                    "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                    "home": home,
                    "location": home,
                    "routine": rng.choice(_ROUTINES),
                    "energy": round(rng.uniform(40, 100), 1),
                    # Staggered so the first minutes are not one thundering herd.
                    "next_decision_at": float(i * 5),
                    "tier": int(Tier.DORMANT),
                }
            )
        ids = await store.add_npcs(world_id, rows)
        sessions = []
        offset = 0
        for user, location, scene in spec.sessions:
            scene_ids = ids[offset : offset + scene]
            involved = ids[offset + scene : offset + scene + 5]
            offset += scene + 5
            sid = await store.add_session(
                world_id, user, location=location, scene_npc_ids=scene_ids, involved_npc_ids=involved
            )
            sessions.append(SessionView(sid, user, location, frozenset(scene_ids), frozenset(involved)))
        placements = [NpcPlacement(npc_id, r["location"], r["home"]) for npc_id, r in zip(ids, rows, strict=True)]
        assignment = assign_tiers(placements, sessions, config.tiers.capacities())
        await store.set_npc_tiers(world_id, assignment.tiers)
        await _seed_interactions(store, world_id, sessions, ids, config.time_scale)
        created.append(world_id)
    return created


_KINDS = ("portrait", "dialogue", "scene-image")


async def _seed_interactions(
    store: Store, world_id: int, sessions: list[SessionView], npc_ids: list[int], time_scale: float
) -> None:
    """Pending generation requests per session and one chain per session (or per world)."""
    for view in sessions:
        for i in range(8):
            await generation.create_request(
                store,
                world_id,
                view.id,
                _KINDS[i % len(_KINDS)],
                {"prompt": f"{view.user_id} #{i}", "location": view.location},
                npc_id=min(view.scene_npc_ids) if view.scene_npc_ids else None,
                priority=1 if i < 2 else 0,
            )
    # Waits chosen so steps fire every few real seconds at the world's timeScale.
    if time_scale <= 60:
        waits = [wait_minutes(2), wait_minutes(3), wait_minutes(5)]
    else:
        waits = [wait_hours(1), wait_hours(1), wait_hours(2), wait_hours(3)]
    steps = [step(w, {"beat": i}) for i, w in enumerate(waits)]
    if sessions:
        for view in sessions:
            npc = min(view.scene_npc_ids) if view.scene_npc_ids else None
            await chains.start_chain(store, world_id, steps, chain_key="visit", session_id=view.id, npc_id=npc)
    else:
        await chains.start_chain(store, world_id, steps, chain_key="market-day", npc_id=npc_ids[0])
