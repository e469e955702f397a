"""``worlds list`` and ``worlds show``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from scheduler_daemon.cli.base import CliError, load_cli_settings, open_store, run_async
from scheduler_daemon.cli.output import print_json_lines, print_table


def cmd_worlds(args: argparse.Namespace) -> int:
    settings, _, _ = load_cli_settings(args)
    defaults = settings.defaults.simulation

    async def main() -> int:
        store = await open_store(settings, args)
        try:
            if args.worlds_command == "list":
                worlds = await _list(store, defaults)
            else:
                print(json.dumps(await _show(store, args.world_id, defaults), indent=2, default=str))
                return 0
        finally:
            await store.dispose()
        if args.json:
            print_json_lines(worlds)
        else:
            print_table(
                ("ID", "NAME", "STATE", "WORLD TIME", "TICKS", "SCALE", "PROBLEM"),
                [
                    (
                        str(w["id"]),
                        w["name"],
                        w["state"],
                        w["worldTimeHuman"],
                        str(w["ticks"]),
                        "?" if w["timeScale"] is None else f"{w['timeScale']:g}",
                        (w["problem"] or "").removeprefix(f"world {w['id']}: "),
                    )
                    for w in worlds
                ],
            )
        return 0

    return run_async(main)


async def _list(store: Any, defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``worlds list``: one dict per world, the ``--json`` shape (docs/operations.md)."""
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.world_config import WorldConfigError, parse_world_config

    active = await store.discover_active_worlds()
    out = []
    for w in await store.list_worlds():
        scale, state, problem = None, "invalid", w.problem
        if w.problem is None:
            try:
                cfg = parse_world_config(w.simulation_raw, world_id=w.id, defaults=defaults)
            except WorldConfigError as exc:
                problem = str(exc)
            else:
                scale = cfg.time_scale
                state = "paused" if cfg.pause_simulation else "running"
                if w.id not in active:
                    state = "inactive"
        out.append(
            {
                "id": w.id,
                "name": w.name,
                "state": state,
                "worldTime": w.world_time or 0.0,
                "worldTimeHuman": format_world_time(w.world_time or 0.0),
                "ticks": w.ticks or 0,
                "timeScale": scale,
                "problem": problem,
            }
        )
    return out


async def _show(store: Any, world_id: int, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``worlds show``: the world as one JSON object."""
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.simulation.npc import Tier
    from scheduler_daemon.store.errors import WorldNotFoundError
    from scheduler_daemon.world_config import WorldConfigError, parse_world_config

    try:
        w = await store.get_world(world_id)
    except WorldNotFoundError as exc:
        raise CliError(str(exc), 1) from None
    config: Any = w.simulation_raw
    config_error = None
    if w.problem is None:
        try:
            config = parse_world_config(w.simulation_raw, world_id=w.id, defaults=defaults).to_wire()
        except WorldConfigError as exc:
            config_error = str(exc)
    counts = await store.tier_counts(w.id)
    population = {t.label: counts.get(t, 0) for t in Tier}
    return {
        "id": w.id,
        "name": w.name,
        "worldTime": w.world_time,
        "worldTimeHuman": format_world_time(w.world_time or 0.0),
        "ticks": w.ticks,
        "lastAdvancedAt": w.last_advanced_at.isoformat() if w.last_advanced_at else None,
        "configVersion": w.config_version,
        "config": config,
        "configError": config_error,
        # Why the world cannot run: its stored row, or its config.
        "problem": w.problem or config_error,
        "tierPopulation": population,
        # Deprecated name of tierPopulation (the API's npcsPerTier means decisions), kept one release.
        "npcsPerTier": population,
        "quarantinedNpcs": {str(npc): why for npc, why in (await store.npc_problems(w.id)).items()},
        "activities": {
            (name if name is not None else "(undecided)"): n
            for name, n in sorted((await store.activity_counts(w.id)).items(), key=lambda x: x[0] or "")
        },
        "activeSessions": await store.count_active_sessions(w.id),
    }
