"""Command line: ``scheduler-daemon <command>``.

User mistakes (bad arguments, bad config, unreachable or unmigrated database)
end in one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from scheduler_daemon import __version__
from scheduler_daemon.settings import DEFAULT_CONFIG_PATH, Settings, SettingsError, load_settings

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code attached."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _add_config(p: argparse.ArgumentParser) -> None:
    # SUPPRESS so `--config` works both before and after the subcommand.
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}, if it exists)",
    )


def _world_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"world id must be an integer, got {text!r}") from None
    if value < 1 or value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"world id out of range: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _request_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request id must be an integer, got {text!r}") from None
    if value < 1 or value > 2**63 - 1:
        raise argparse.ArgumentTypeError(f"request id out of range: {value}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"expected 1 … 100000, got {value}")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers, got {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected 1 … 64 workers, got {value}")
    return value


def _add_jobs_parsers(sub: Any) -> None:
    from scheduler_daemon.simulation import chains, generation

    jobs = sub.add_parser("jobs", help="generation requests").add_subparsers(
        dest="jobs_command", metavar="ACTION", required=True
    )
    p = jobs.add_parser("list", help="show the generation queue")
    p.add_argument("--world", type=_world_id, help="only this world")
    p.add_argument("--status", choices=generation.STATUSES, help="only this status")
    p.add_argument("--limit", type=_limit, default=100, help="at most this many rows (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _add_config(p)
    p = jobs.add_parser("complete", help="report a request's outcome (as a worker would)")
    p.add_argument("request_id", type=_request_id)
    p.add_argument("--status", required=True, choices=generation.COMPLETION_STATUSES)
    p.add_argument("--error", help="error text kept on the request")
    _add_config(p)
    p = jobs.add_parser("cancel", help="cancel a pending or enqueued request")
    p.add_argument("request_id", type=_request_id)
    _add_config(p)

    chain_cmds = sub.add_parser("chains", help="interaction chains").add_subparsers(
        dest="chains_command", metavar="ACTION", required=True
    )
    p = chain_cmds.add_parser("list", help="show interaction chains and their progress")
    p.add_argument("--world", type=_world_id, help="only this world")
    p.add_argument("--status", choices=chains.STATUSES, help="only this status")
    p.add_argument("--limit", type=_limit, default=100, help="at most this many rows (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _add_config(p)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used for ``--help`` tests)."""
    parser = argparse.ArgumentParser(prog="scheduler-daemon", description="World Simulation Scheduler daemon")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_config(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--workers", type=_workers, help="daemon processes sharing the worlds (default [scheduler] workers)")
    # How a supervisor starts its workers (run --workers N); not for users.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-socket", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    _add_config(p)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("path", type=Path, nargs="?", help="config file (default: --config or the default path)")
    _add_config(p)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", metavar="ACTION", required=True)
    p = db.add_parser("upgrade", help="apply pending migrations")
    _add_config(p)
    p = db.add_parser("check", help="exit 0 if the schema is current, 4 if not")
    _add_config(p)

    p = sub.add_parser("demo", help="seed demo worlds into the configured database (idempotent)")
    _add_config(p)

    worlds = sub.add_parser("worlds", help="inspect worlds").add_subparsers(
        dest="worlds_command", metavar="ACTION", required=True
    )
    p = worlds.add_parser("list", help="list worlds with their clocks")
    _add_config(p)
    p = worlds.add_parser("show", help="show one world: clock, config, NPC stats")
    p.add_argument("world_id", type=_world_id)
    _add_config(p)
    _add_jobs_parsers(sub)
    from scheduler_daemon.transfer.commands import add_transfer_parsers

    add_transfer_parsers(sub, _add_config)

    p = sub.add_parser("top", help="live table of a running daemon's worlds (admin API)")
    p.add_argument("--url", help="daemon base URL (default: from [http] bind/port of the config)")
    p.add_argument("--token-file", type=Path, help="admin token file (default: [http] admin_token_file)")
    p.add_argument("--interval", type=_positive_float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one table and exit (scripts)")
    _add_config(p)

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
    p.add_argument("--world", dest="world_id", type=_world_id, required=True, metavar="ID", help="world id")
    p.add_argument("--game-hours", type=_positive_float, required=True, metavar="H", help="game hours to simulate")
    p.add_argument("--dry-run", action="store_true", help="simulate on a temporary copy; commit nothing")
    p.add_argument("--force", action="store_true", help="commit even if the world was ticked recently")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_config(p)
    return parser


def _settings(args: argparse.Namespace) -> tuple[Settings, Path | None, bool]:
    path: Path | None = getattr(args, "config", None)
    explicit = path is not None
    if path is None:
        path = DEFAULT_CONFIG_PATH
    try:
        return load_settings(path, required=explicit), path, explicit
    except SettingsError as exc:
        raise CliError(f"invalid configuration: {exc}", EXIT_USAGE) from None


def _run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(main())


async def _open_store(settings: Settings, *, check: bool = True) -> Any:
    from scheduler_daemon.exits import EXIT_DATABASE, EXIT_NOT_MIGRATED
    from scheduler_daemon.store.errors import SchemaNotMigratedError
    from scheduler_daemon.store.repository import Store

    store = Store.from_url(settings.database.url, connect_timeout=settings.database.connect_timeout_seconds)
    try:
        await store.ping()
        if check:
            await store.check_schema()
    except SchemaNotMigratedError as exc:
        await store.dispose()
        raise CliError(str(exc), EXIT_NOT_MIGRATED) from None
    except Exception as exc:
        await store.dispose()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CliError(f"cannot reach the database: {first}", EXIT_DATABASE) from None
    return store


def cmd_run(args: argparse.Namespace) -> int:
    from scheduler_daemon.daemon import WorkerRole
    from scheduler_daemon.exits import StartupError
    from scheduler_daemon.supervisor import run_command

    settings, path, explicit = _settings(args)
    worker = None
    if args.worker_socket is not None:
        worker = WorkerRole(args.worker_index or 0, args.worker_socket, args.supervisor_pid or os.getppid())
    try:
        return run_command(settings, path, config_required=explicit, workers=args.workers, worker=worker)
    except StartupError as exc:
        raise CliError(str(exc), exc.exit_code) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    path: Path | None = args.path or getattr(args, "config", None) or DEFAULT_CONFIG_PATH
    from scheduler_daemon.exits import StartupError
    from scheduler_daemon.supervisor import check_workers

    try:
        settings = load_settings(path, required=True)
        check_workers(settings, settings.scheduler.workers, f"{path}: scheduler.workers")
    except (SettingsError, StartupError) as exc:
        raise CliError(f"invalid configuration: {exc}", EXIT_USAGE) from None
    driver = settings.database.url.split("://", 1)[0]
    print(f"{path}: OK (database {driver}, http {settings.http.bind}:{settings.http.port})")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings, _, _ = _settings(args)

    async def main() -> int:
        store = await _open_store(settings, check=False)
        try:
            if args.db_command == "upgrade":
                before, after = await store.upgrade()
                if before == after:
                    print(f"schema already at {', '.join(sorted(after))}")
                else:
                    print(f"schema upgraded: {', '.join(sorted(before)) or '(empty)'} -> {', '.join(sorted(after))}")
                return 0
            await store.check_schema()
            print("schema is current")
            return 0
        finally:
            await store.dispose()

    try:
        return _run_async(main)
    except Exception as exc:
        if isinstance(exc, CliError):
            raise
        from scheduler_daemon.store.errors import SchemaNotMigratedError

        if isinstance(exc, SchemaNotMigratedError):
            raise CliError(str(exc), 4) from None
        raise


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler_daemon.demo import seed_demo

    settings, _, _ = _settings(args)

    async def main() -> int:
        store = await _open_store(settings)
        try:
            created = await seed_demo(store)
        finally:
            await store.dispose()
        if created:
            print(f"demo seeded: worlds {', '.join(str(w) for w in created)}")
        else:
            print("demo worlds already present; nothing to do")
        return 0

    return _run_async(main)


def cmd_worlds(args: argparse.Namespace) -> int:
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.simulation.npc import Tier
    from scheduler_daemon.store.errors import WorldNotFoundError
    from scheduler_daemon.world_config import WorldConfigError, parse_world_config

    settings, _, _ = _settings(args)
    defaults = settings.defaults.simulation

    async def main() -> int:
        store = await _open_store(settings)
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
                _print_table(("ID", "NAME", "STATE", "WORLD TIME", "TICKS", "SCALE", "PROBLEM"), rows)
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

    return _run_async(main)


def cmd_jobs(args: argparse.Namespace) -> int:
    from scheduler_daemon import generation

    settings, _, _ = _settings(args)

    async def main() -> int:
        store = await _open_store(settings)
        try:
            if args.jobs_command == "list":
                requests = await generation.list_requests(
                    store, world_id=args.world, status=args.status, limit=args.limit
                )
                if args.json:
                    for r in requests:
                        print(json.dumps(r.to_wire(), default=str))
                    return 0
                rows = [
                    (
                        str(r.id),
                        str(r.world_id),
                        r.user_id,
                        r.kind,
                        str(r.priority),
                        r.status + ("" if r.status != "enqueued" or r.handed_off else " (outbox)"),
                        str(r.attempts),
                        (r.last_error or "").splitlines()[0][:60] if r.last_error else "",
                    )
                    for r in requests
                ]
                _print_table(("ID", "WORLD", "USER", "KIND", "PRIO", "STATUS", "ATTEMPTS", "LAST ERROR"), rows)
                return 0
            try:
                if args.jobs_command == "complete":
                    done = await generation.complete_request(store, args.request_id, args.status, args.error)
                else:
                    done = await generation.cancel_request(store, args.request_id)
            except (generation.RequestNotFoundError, generation.RequestStateError) as exc:
                raise CliError(str(exc), 1) from None
            print(f"generation request {done.id}: {done.status}")
            return 0
        finally:
            await store.dispose()

    return _run_async(main)


def cmd_chains(args: argparse.Namespace) -> int:
    from scheduler_daemon.chains import list_chains
    from scheduler_daemon.context import format_world_time

    settings, _, _ = _settings(args)

    async def main() -> int:
        store = await _open_store(settings)
        try:
            chains = await list_chains(store, world_id=args.world, status=args.status, limit=args.limit)
        finally:
            await store.dispose()
        if args.json:
            for c in chains:
                print(json.dumps(c.to_wire(), default=str))
            return 0
        rows = []
        for c in chains:
            total = len(c.steps) if isinstance(c.steps, list) else 0
            rows.append(
                (
                    str(c.id),
                    str(c.world_id),
                    "" if c.session_id is None else str(c.session_id),
                    "" if c.npc_id is None else str(c.npc_id),
                    c.chain_key,
                    c.status,
                    f"{c.current_step}/{total}",
                    format_world_time(c.next_step_at) if c.next_step_at is not None else "",
                    (c.last_error or "")[:60],
                )
            )
        _print_table(("ID", "WORLD", "SESSION", "NPC", "KEY", "STATUS", "STEP", "NEXT STEP AT", "LAST ERROR"), rows)
        return 0

    return _run_async(main)


def cmd_simulate(args: argparse.Namespace) -> int:
    from scheduler_daemon.context import format_world_time
    from scheduler_daemon.fastforward import FastForwardError, fast_forward
    from scheduler_daemon.logs import configure_logging
    from scheduler_daemon.plugins import Plugins
    from scheduler_daemon.store.errors import WorldNotFoundError

    settings, _, _ = _settings(args)
    # Per-world INFO lines would drown the report; warnings (lag) still show.
    level = settings.logging.level if settings.logging.level not in ("DEBUG", "INFO") else "WARNING"
    configure_logging(level, settings.logging.format, stream=sys.stderr)
    try:
        plugins = Plugins.from_settings(settings)
    except SettingsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None

    async def main() -> int:
        store = await _open_store(settings)
        try:
            summary = await fast_forward(
                store,
                args.world_id,
                args.game_hours,
                dry_run=args.dry_run,
                force=args.force,
                settings=settings,
                plugins=plugins,
            )
        except (WorldNotFoundError, FastForwardError) as exc:
            raise CliError(str(exc), 1) from None
        except ValueError as exc:  # invalid stored config or behaviour: names world and field
            raise CliError(str(exc), EXIT_USAGE) from None
        finally:
            await plugins.aclose()
            await store.dispose()
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2))
        else:
            print(summary.render(format_world_time))
        return 0

    return _run_async(main)


def cmd_transfer(args: argparse.Namespace) -> int:
    from scheduler_daemon.logs import configure_logging
    from scheduler_daemon.transfer.commands import TransferError, run_transfer

    settings, _, _ = _settings(args)
    # stdout carries the export or the summary: logs go to stderr, warnings and up.
    level = settings.logging.level if settings.logging.level not in ("DEBUG", "INFO") else "WARNING"
    configure_logging(level, settings.logging.format, stream=sys.stderr)

    async def main() -> int:
        store = await _open_store(settings)
        try:
            return await run_transfer(store, args, settings.defaults.simulation)
        except TransferError as exc:
            raise CliError(str(exc), exc.exit_code) from None
        finally:
            await store.dispose()

    return _run_async(main)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def cmd_top(args: argparse.Namespace) -> int:
    from scheduler_daemon.http.auth import load_admin_token
    from scheduler_daemon.settings import HttpSettings
    from scheduler_daemon.top import TopError, run_top

    settings, _, _ = _settings(args)
    url = args.url
    if url is None:
        host = settings.http.bind
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 (a wildcard bind is reachable on loopback)
            host = "127.0.0.1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{settings.http.port}"
    try:
        if args.token_file is not None:
            token = load_admin_token(HttpSettings(admin_token_file=args.token_file))
        else:
            try:
                token = load_admin_token(settings.http)
            except SettingsError:
                token = None  # e.g. not readable by this user: the server says 401 if it needs one
    except SettingsError as exc:
        raise CliError(str(exc).replace("http.admin_token_file", "--token-file"), EXIT_USAGE) from None
    try:
        return run_top(url, token, interval=args.interval, once=args.once)
    except TopError as exc:
        raise CliError(str(exc), 1) from None


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"scheduler-daemon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
