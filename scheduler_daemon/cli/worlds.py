"""``worlds list`` and ``worlds show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from scheduler_daemon.cli.base import CliError, load_cli_settings, open_store, run_async
from scheduler_daemon.cli.output import print_table


def cmd_worlds(args: argparse.Namespace) -> int:
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.simulation.npc import Tier
    from scheduler_daemon.store.errors import WorldNotFoundError
    from scheduler_daemon.world_config import WorldConfigError, parse_world_config

    settings, _, _ = load_cli_settings(args)
    defaults = settings.defaults.simulation

    async def main() -> int:
        store = await open_store(settings)
        try:
            if args.worlds_command == "list":
                active = await store.discover_active_worlds()
                rows = []
                for w in await store.list_worlds():
                    scale, state, problem = "?", "invalid", w.problem or ""
                    if w.problem is None:
                        try:
                            cfg = parse_world_config(w.simulation_raw, world_id=w.id, defaults=defaults)
                        except WorldConfigError as exc:
                            problem = str(exc)
                        else:
                            scale = f"{cfg.time_scale:g}"
                            state = "paused" if cfg.pause_simulation else "running"
                            if w.id not in active:
                                state = "inactive"
                    rows.append(
                        (
                            str(w.id),
                            w.name,
                            state,
                            format_world_time(w.world_time or 0.0),
                            str(w.ticks or 0),
                            scale,
                            problem.removeprefix(f"world {w.id}: "),
                        )
                    )
                print_table(("ID", "NAME", "STATE", "WORLD TIME", "TICKS", "SCALE", "PROBLEM"), rows)
                return 0
            try:
                w = await store.get_world(args.world_id)
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
            out = {
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
                "npcsPerTier": {t.label: counts.get(t, 0) for t in Tier},
                "quarantinedNpcs": {str(npc): why for npc, why in (await store.npc_problems(w.id)).items()},
                "activities": {
                    (name if name is not None else "(undecided)"): n
                    for name, n in sorted((await store.activity_counts(w.id)).items(), key=lambda x: x[0] or "")
                },
                "activeSessions": await store.count_active_sessions(w.id),
            }
            print(json.dumps(out, indent=2, default=str))
            return 0
        finally:
            await store.dispose()

    return run_async(main)
