"""What every command needs: the one-line user error, the settings, an open store."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from scheduler_daemon.settings import DEFAULT_CONFIG_PATH, Settings, SettingsError, load_settings, read_config_file

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code attached."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_config(p: argparse.ArgumentParser) -> None:
    """``--config``/``-c`` on a parser."""
    # SUPPRESS so `--config` works both before and after the subcommand.
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}, if it exists)",
    )


def load_cli_settings(args: argparse.Namespace) -> tuple[Settings, Path | None, bool]:
    """The settings of ``--config`` (or the default file), the path, and whether it was given."""
    path: Path | None = getattr(args, "config", None)
    explicit = path is not None
    if path is None:
        path = DEFAULT_CONFIG_PATH
    try:
        return load_settings(path, required=explicit), path, explicit
    except SettingsError as exc:
        raise CliError(f"invalid configuration: {exc}", EXIT_USAGE) from None


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run one command's coroutine."""
    return asyncio.run(main())


def database_url_source(args: argparse.Namespace) -> str:
    """Where ``database.url`` came from: the environment, the config file, or the default."""
    if any(name.upper() == "SCHEDULER_DATABASE__URL" for name in os.environ):
        return "from SCHEDULER_DATABASE__URL"
    path: Path = getattr(args, "config", None) or DEFAULT_CONFIG_PATH
    try:
        in_file = "url" in read_config_file(path).get("database", {})
    except SettingsError:
        in_file = False  # the default path does not exist: the settings were read without it
    if in_file:
        return f"database.url in {path}"
    return f"the default database.url; set it in {path} or SCHEDULER_DATABASE__URL"


async def open_store(settings: Settings, args: argparse.Namespace, *, check: bool = True) -> Any:
    """The configured store, reachable and (with ``check``) at the current schema; else :class:`CliError`.

    A connection error names the database tried and where its URL came from;
    a SQLite file that cannot be opened fails before any connection attempt.
    """
    from scheduler_daemon.exits import EXIT_DATABASE, EXIT_NOT_MIGRATED
    from scheduler_daemon.retry import first_line
    from scheduler_daemon.store.errors import SchemaNotMigratedError
    from scheduler_daemon.store.repository import Store
    from scheduler_daemon.store.target import describe_database, sqlite_open_problem

    url = settings.database.url

    def unreachable(why: str) -> CliError:
        where = f"{describe_database(url)} ({database_url_source(args)})"
        return CliError(f"cannot open the database: {where}: {why}", EXIT_DATABASE)

    if (problem := sqlite_open_problem(url)) is not None:
        raise unreachable(problem)
    store = Store.from_url(url, connect_timeout=settings.database.connect_timeout_seconds)
    try:
        await store.ping()
        if check:
            await store.check_schema()
    except SchemaNotMigratedError as exc:
        await store.dispose()
        raise CliError(str(exc), EXIT_NOT_MIGRATED) from None
    except Exception as exc:
        await store.dispose()
        raise unreachable(first_line(getattr(exc, "orig", None) or exc)) from None
    return store
