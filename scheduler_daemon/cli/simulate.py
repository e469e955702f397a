"""``simulate``: fast-forward one world and print the summary."""

from __future__ import annotations

import argparse
import json
import sys

from scheduler_daemon.cli.base import EXIT_USAGE, CliError, load_cli_settings, open_store, run_async
from scheduler_daemon.progress import ProgressBar, wanted
from scheduler_daemon.settings import SettingsError


def cmd_simulate(args: argparse.Namespace) -> int:
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.fastforward import FastForwardError, fast_forward
    from scheduler_daemon.logs import configure_logging
    from scheduler_daemon.plugins import Plugins
    from scheduler_daemon.store.errors import WorldNotFoundError

    settings, _, _ = load_cli_settings(args)
    # Per-world INFO lines would drown the report; warnings (lag) still show.
    level = settings.logging.level if settings.logging.level not in ("DEBUG", "INFO") else "WARNING"
    configure_logging(level, settings.logging.format, stream=sys.stderr)
    try:
        plugins = Plugins.from_settings(settings)
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None

    async def main() -> int:
        store = await open_store(settings, args)
        hours = args.game_hours
        bar = ProgressBar(sys.stderr, "simulating", round(hours * 3600), enabled=wanted(sys.stderr, quiet=args.quiet))

        def advanced(game_seconds: float, ticks: int) -> None:
            bar.update(round(game_seconds), f"{game_seconds / 3600:.1f}/{hours:g} game hours, {ticks} ticks")

        try:
            summary = await fast_forward(
                store,
                args.world_id,
                args.game_hours,
                dry_run=args.dry_run,
                force=args.force,
                settings=settings,
                plugins=plugins,
                progress=advanced,
            )
        except (WorldNotFoundError, FastForwardError) as exc:
            raise CliError(str(exc), 1) from None
        except ValueError as exc:  # invalid stored config or behaviour: names world and field
            raise CliError(str(exc), EXIT_USAGE) from None
        finally:
            bar.close()
            await plugins.aclose()
            await store.dispose()
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2))
        else:
            print(summary.render(format_world_time))
        return 0

    return run_async(main)
