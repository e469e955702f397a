"""``import`` and ``export`` (the work is in :mod:`scheduler_daemon.transfer`)."""

from __future__ import annotations

import argparse
import sys

from scheduler_daemon.cli.base import CliError, load_cli_settings, open_store, run_async


def cmd_transfer(args: argparse.Namespace) -> int:
    from scheduler_daemon.logs import configure_logging
    from scheduler_daemon.transfer.commands import TransferError, run_transfer

    settings, _, _ = load_cli_settings(args)
    # stdout carries the export or the summary: logs go to stderr, warnings and up.
    level = settings.logging.level if settings.logging.level not in ("DEBUG", "INFO") else "WARNING"
    configure_logging(level, settings.logging.format, stream=sys.stderr)

    async def main() -> int:
        store = await open_store(settings, args)
        try:
            return await run_transfer(store, args, settings.defaults.simulation)
        except TransferError as exc:
            raise CliError(str(exc), exc.exit_code) from None
        finally:
            await store.dispose()

    return run_async(main)
