"""Command line: ``scheduler-daemon <command>``.

User mistakes (bad arguments, bad config, unreachable or unmigrated database)
end in one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from scheduler_daemon import __version__
from scheduler_daemon.cli.args import positive_float, workers_arg, world_id_arg
from scheduler_daemon.cli.base import CliError, add_config
from scheduler_daemon.cli.daemon import cmd_check_config, cmd_run, cmd_top
from scheduler_daemon.cli.db import cmd_db, cmd_demo
from scheduler_daemon.cli.jobs import add_jobs_parsers, cmd_chains, cmd_jobs
from scheduler_daemon.cli.output import open_closed_streams, silence_stdout
from scheduler_daemon.cli.simulate import cmd_simulate
from scheduler_daemon.cli.transfer import cmd_transfer
from scheduler_daemon.cli.worlds import cmd_worlds
from scheduler_daemon.exits import EXIT_FAILURE

__all__ = ["CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used for ``--help`` tests)."""
    parser = argparse.ArgumentParser(prog="scheduler-daemon", description="World Simulation Scheduler daemon")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument(
        "--workers", type=workers_arg, help="daemon processes sharing the worlds (default [scheduler] workers)"
    )
    # How a supervisor starts its workers (run --workers N); not for users.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-socket", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    add_config(p)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("path", type=Path, nargs="?", help="config file (default: --config or the default path)")
    add_config(p)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", metavar="ACTION", required=True)
    p = db.add_parser("upgrade", help="apply pending migrations")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_config(p)
    p = db.add_parser("check", help="exit 0 if the schema is current, 4 if not")
    add_config(p)

    p = sub.add_parser("demo", help="seed demo worlds into the configured database (idempotent)")
    add_config(p)

    worlds = sub.add_parser("worlds", help="inspect worlds").add_subparsers(
        dest="worlds_command", metavar="ACTION", required=True
    )
    p = worlds.add_parser("list", help="list worlds with their clocks")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_config(p)
    p = worlds.add_parser("show", help="show one world: clock, config, NPC stats")
    p.add_argument("world_id", type=world_id_arg)
    add_config(p)
    add_jobs_parsers(sub)
    from scheduler_daemon.transfer.commands import add_transfer_parsers

    add_transfer_parsers(sub, add_config)

    p = sub.add_parser("top", help="live table of a running daemon's worlds (admin API)")
    p.add_argument("--url", help="daemon base URL (default: from [http] bind/port of the config)")
    p.add_argument("--token-file", type=Path, help="admin token file (default: [http] admin_token_file)")
    p.add_argument("--interval", type=positive_float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one table and exit (scripts)")
    add_config(p)

    p = sub.add_parser(
        "simulate",
        help="fast-forward one world through the real tick pipeline and print what happened",
        description=(
            "Run the real tick pipeline for one world on a virtual clock, as fast as possible, "
            "and print a designer's summary. Without --dry-run the ticks are committed like the "
            "daemon's; a world ticked in the last 30 s (a daemon is probably running it) is refused "
            "unless --force."
        ),
    )
    p.add_argument("--world", dest="world_id", type=world_id_arg, required=True, metavar="ID", help="world id")
    p.add_argument("--game-hours", type=positive_float, required=True, metavar="H", help="game hours to simulate")
    p.add_argument("--dry-run", action="store_true", help="simulate on a temporary copy; commit nothing")
    p.add_argument("--force", action="store_true", help="commit even if the world was ticked recently")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_config(p)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "db": cmd_db,
    "demo": cmd_demo,
    "worlds": cmd_worlds,
    "jobs": cmd_jobs,
    "chains": cmd_chains,
    "top": cmd_top,
    "simulate": cmd_simulate,
    "import": cmd_transfer,
    "export": cmd_transfer,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scheduler-daemon`` command."""
    open_closed_streams()
    try:
        try:
            return _run(argv)
        finally:
            # Here, so a closed pipe is caught below and not at exit; also after --help.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`jobs list | head -1`): stop quietly, as `cat` would.
        silence_stdout()
        return EXIT_FAILURE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"scheduler-daemon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
