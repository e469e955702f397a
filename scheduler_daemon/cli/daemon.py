"""``run``, ``check-config`` and ``top``: the daemon itself, its config, its live view."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scheduler_daemon.cli.base import EXIT_USAGE, CliError, load_cli_settings
from scheduler_daemon.settings import DEFAULT_CONFIG_PATH, SettingsError, load_settings


def cmd_run(args: argparse.Namespace) -> int:
    from scheduler_daemon.daemon import WorkerRole
    from scheduler_daemon.exits import StartupError
    from scheduler_daemon.supervisor import run_command

    settings, path, explicit = load_cli_settings(args)
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


def cmd_top(args: argparse.Namespace) -> int:
    from scheduler_daemon.http.auth import load_admin_token
    from scheduler_daemon.settings import HttpSettings
    from scheduler_daemon.top import TopError, run_top

    settings, _, _ = load_cli_settings(args)
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
