"""``db upgrade``, ``db check`` and ``demo``: the schema and the demo worlds."""

from __future__ import annotations

import argparse
import sys

from scheduler_daemon.cli.base import CliError, load_cli_settings, open_store, run_async
from scheduler_daemon.progress import ProgressBar, wanted


def cmd_db(args: argparse.Namespace) -> int:
    settings, _, _ = load_cli_settings(args)

    async def main() -> int:
        store = await open_store(settings, args, check=False)
        try:
            if args.db_command == "upgrade":
                bar = ProgressBar(sys.stderr, "upgrading schema:", None, enabled=wanted(sys.stderr, quiet=args.quiet))
                try:
                    before, after = await store.upgrade(
                        lambda done, total, revision: bar.update(done, f"migration {done}/{total} ({revision})")
                    )
                finally:
                    bar.close()
                # The result, not progress: printed also when not on a terminal.
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
        return run_async(main)
    except Exception as exc:
        if isinstance(exc, CliError):
            raise
        from scheduler_daemon.store.errors import SchemaNotMigratedError

        if isinstance(exc, SchemaNotMigratedError):
            raise CliError(str(exc), 4) from None
        raise


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler_daemon.demo import seed_demo

    settings, _, _ = load_cli_settings(args)

    async def main() -> int:
        store = await open_store(settings, args)
        try:
            created = await seed_demo(store)
        finally:
            await store.dispose()
        if created:
            print(f"demo seeded: worlds {', '.join(str(w) for w in created)}")
        else:
            print("demo worlds already present; nothing to do")
        return 0

    return run_async(main)
