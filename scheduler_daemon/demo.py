"""Demo content for ``make run``: three worlds, a few hundred NPCs, sessions.

Idempotent: worlds are recognised by ``meta["demo"]`` and never seeded twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from scheduler_daemon.simulation.behavior import DEMO_BEHAVIOR
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
        {"timeScale": 60, "tickIntervalSeconds": 1.0},
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
        created.append(world_id)
    return created
