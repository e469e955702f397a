"""``jobs`` and ``chains``: the generation queue and interaction chains."""

from __future__ import annotations

import argparse
from typing import Any

from scheduler_daemon.cli.args import limit_arg, request_id_arg, world_id_arg
from scheduler_daemon.cli.base import CliError, add_config, load_cli_settings, open_store, run_async
from scheduler_daemon.cli.output import print_json_lines, print_table


def add_jobs_parsers(sub: Any) -> None:
    """The ``jobs`` and ``chains`` subcommands."""
    from scheduler_daemon.simulation import chains, generation

    jobs = sub.add_parser("jobs", help="generation requests").add_subparsers(
        dest="jobs_command", metavar="ACTION", required=True
    )
    p = jobs.add_parser("list", help="show the generation queue")
    p.add_argument("--world", type=world_id_arg, help="only this world")
    p.add_argument("--status", choices=generation.STATUSES, help="only this status")
    p.add_argument("--limit", type=limit_arg, default=100, help="at most this many rows (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_config(p)
    p = jobs.add_parser("complete", help="report a request's outcome (as a worker would)")
    p.add_argument("request_id", type=request_id_arg)
    p.add_argument("--status", required=True, choices=generation.COMPLETION_STATUSES)
    p.add_argument("--error", help="error text kept on the request")
    add_config(p)
    p = jobs.add_parser("cancel", help="cancel a pending or enqueued request")
    p.add_argument("request_id", type=request_id_arg)
    add_config(p)

    chain_cmds = sub.add_parser("chains", help="interaction chains").add_subparsers(
        dest="chains_command", metavar="ACTION", required=True
    )
    p = chain_cmds.add_parser("list", help="show interaction chains and their progress")
    p.add_argument("--world", type=world_id_arg, help="only this world")
    p.add_argument("--status", choices=chains.STATUSES, help="only this status")
    p.add_argument("--limit", type=limit_arg, default=100, help="at most this many rows (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_config(p)


def cmd_jobs(args: argparse.Namespace) -> int:
    from scheduler_daemon import generation

    settings, _, _ = load_cli_settings(args)

    async def main() -> int:
        store = await open_store(settings, args)
        try:
            if args.jobs_command == "list":
                requests = await generation.list_requests(
                    store, world_id=args.world, status=args.status, limit=args.limit
                )
                if args.json:
                    print_json_lines(r.to_wire() for r in requests)
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
                print_table(("ID", "WORLD", "USER", "KIND", "PRIO", "STATUS", "ATTEMPTS", "LAST ERROR"), rows)
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

    return run_async(main)


def cmd_chains(args: argparse.Namespace) -> int:
    from scheduler_daemon.chains import list_chains
    from scheduler_daemon.context import format_world_time

    settings, _, _ = load_cli_settings(args)

    async def main() -> int:
        store = await open_store(settings, args)
        try:
            chains = await list_chains(store, world_id=args.world, status=args.status, limit=args.limit)
        finally:
            await store.dispose()
        if args.json:
            print_json_lines(c.to_wire() for c in chains)
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
        print_table(("ID", "WORLD", "SESSION", "NPC", "KEY", "STATUS", "STEP", "NEXT STEP AT", "LAST ERROR"), rows)
        return 0

    return run_async(main)
