"""``scheduler-daemon import FILE`` and ``scheduler-daemon export``: their arguments, output and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from scheduler_daemon.exits import EXIT_CONFIG, EXIT_DATABASE, EXIT_FAILURE, EXIT_INPUT_REJECTED, EXIT_OK

if TYPE_CHECKING:
    from scheduler_daemon.store.repository import Store


class TransferError(Exception):
    """A user-facing failure of ``import``/``export``: one line, with the exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_transfer_parsers(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``import`` and ``export`` subcommands."""
    p = sub.add_parser(
        "import",
        help="create or update worlds with their NPCs and sessions from a JSON or NDJSON file",
        description=(
            "Upsert worlds, their NPCs and sessions by external id, one transaction per world. A world "
            "that is rejected is reported with its line and field and imports nothing; the others go on. "
            f"Exit {EXIT_INPUT_REJECTED} if any world was rejected."
        ),
    )
    p.add_argument("file", metavar="FILE", help="the file, - for stdin (.ndjson/.jsonl: NDJSON; else by content)")
    p.add_argument("--dry-run", action="store_true", help="run every world's transaction, then roll it back")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_config(p)

    p = sub.add_parser(
        "export",
        help="write worlds with their NPCs and sessions in the import format",
        description="Write worlds, world time, NPCs with their state and sessions; `import` reads it back.",
    )
    p.add_argument(
        "--world",
        dest="worlds",
        action="append",
        metavar="REF",
        help="only this world, by daemon id or external id (repeatable; default: every world)",
    )
    p.add_argument("--format", choices=("json", "ndjson"), help="default: by the -o file's ending, else json")
    p.add_argument("-o", "--output", default="-", metavar="FILE", help="write here instead of stdout")
    add_config(p)


async def run_transfer(store: Store, args: argparse.Namespace, defaults: Mapping[str, Any]) -> int:
    """Run ``import`` or ``export`` (``args.command``) against an open store; raises :class:`TransferError`.

    ``defaults`` are the settings' ``[defaults.simulation]``, which imported world configs are validated over.
    """
    import sqlalchemy.exc as sa_exc

    from scheduler_daemon.retry import first_line

    try:
        if args.command == "import":
            return await _run_import(store, args, defaults)
        return await _run_export(store, args)
    except sa_exc.SQLAlchemyError as exc:
        raise TransferError(f"database error: {first_line(exc)}", EXIT_DATABASE) from None


async def _run_import(store: Store, args: argparse.Namespace, defaults: Mapping[str, Any]) -> int:
    from scheduler_daemon.progress import ProgressBar, wanted
    from scheduler_daemon.retry import first_line
    from scheduler_daemon.transfer.files import DocumentError, TransferFileError, open_import_file
    from scheduler_daemon.transfer.importer import ImportInterrupted, import_worlds

    try:
        with open_import_file(args.file) as source:
            label = "checking" if args.dry_run else "importing"
            bar = ProgressBar(sys.stderr, label, source.total, enabled=wanted(sys.stderr, quiet=args.quiet))
            try:
                summary = await import_worlds(store, source, dry_run=args.dry_run, defaults=defaults, progress=bar)
            finally:
                bar.close()
    except ImportInterrupted as exc:
        print(exc.summary.render(), file=sys.stderr)
        raise TransferError(
            f"import stopped by a database error: {first_line(exc.__cause__ or exc)}", EXIT_DATABASE
        ) from None
    except DocumentError as exc:
        raise TransferError(str(exc), EXIT_INPUT_REJECTED) from None
    except TransferFileError as exc:
        raise TransferError(str(exc), EXIT_CONFIG) from None
    try:
        print(json.dumps(summary.to_wire(), indent=2) if args.json else summary.render(), flush=True)
    except BrokenPipeError:
        # The reader went away (`import … | head -1`); the import itself is done, its exit code stands.
        _silence_stdout()
    return EXIT_INPUT_REJECTED if summary.failures else EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again on a closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _run_export(store: Store, args: argparse.Namespace) -> int:
    from scheduler_daemon.transfer.exporter import ExportRefError, export_worlds, resolve_worlds
    from scheduler_daemon.transfer.files import NDJSON_SUFFIXES, FileFormat, TransferFileError, open_export_file

    fmt = FileFormat(args.format) if args.format else None
    if fmt is None:
        fmt = FileFormat.NDJSON if args.output.lower().endswith(NDJSON_SUFFIXES) else FileFormat.JSON
    try:
        # Every reference resolved before anything is written: a typo leaves no file behind.
        world_ids = await resolve_worlds(store, args.worlds) if args.worlds else None
        with open_export_file(args.output) as out:
            counts = await export_worlds(store, world_ids, out, fmt)
    except ExportRefError as exc:
        raise TransferError(str(exc), EXIT_FAILURE) from None
    except TransferFileError as exc:
        raise TransferError(str(exc), EXIT_CONFIG) from None
    except BrokenPipeError:
        # The reader went away (`export | head`): stop quietly.
        _silence_stdout()
        raise TransferError("the output was closed before the export ended", EXIT_FAILURE) from None
    except OSError as exc:  # writing the file: disk full, quota (the partial file is removed)
        raise TransferError(f"{args.output}: {exc.strerror or exc}", EXIT_FAILURE) from None
    for warning in counts.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    where = "stdout" if args.output == "-" else args.output
    print(f"exported {counts.render()} to {where} ({fmt})", file=sys.stderr)
    return EXIT_OK
