"""Start-up at scale: time to ``READY=1`` and resident memory of the real daemon with many worlds.

``python -m bench.startup [--worlds N] [--backend sqlite,postgresql]`` (also
part of ``make bench``; alone it writes ``bench/results/startup.json``).
Seeds N always-on worlds ticking every 5 s (each with a few dormant NPCs) in
a fresh database and starts ``scheduler-daemon run`` as a subprocess with
``$NOTIFY_SOCKET`` pointing at a datagram socket of ours. Reports per backend:
seconds from spawn to ``READY=1``; the ``EXTEND_TIMEOUT_USEC`` and
``STATUS=registering …`` messages sent meanwhile; the daemon's RSS at READY
and after a settling window (which starts one tick interval after READY);
the ticks it committed and missed in that window (from ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import e2e
from bench.common import progress
from scheduler_daemon.store.models import npcs, world_states, worlds
from scheduler_daemon.store.repository import Store

INTERVAL = 5.0
NPCS_PER_WORLD = 5
ROOT = Path(__file__).resolve().parent.parent


def seed(url: str, count: int) -> None:
    """``count`` always-on worlds (5 s ticks) with a few NPCs each, set-based."""

    async def main() -> None:
        store = Store.from_url(url)
        try:
            await store.upgrade()
            simulation = {"alwaysOn": True, "tickIntervalSeconds": INTERVAL, "maxCatchUpSeconds": 60.0}
            async with store.transaction() as conn:
                for start in range(0, count, 2000):
                    rows = [
                        {"name": f"startup-{i}", "meta": {"simulation": simulation}}
                        for i in range(start, min(start + 2000, count))
                    ]
                    ids = list(
                        (
                            await conn.execute(
                                sa.insert(worlds).returning(worlds.c.id, sort_by_parameter_order=True), rows
                            )
                        ).scalars()
                    )
                    await conn.execute(sa.insert(world_states), [{"world_id": w} for w in ids])
                    await conn.execute(
                        sa.insert(npcs),
                        [
                            {"world_id": w, "name": f"n{j}", "state": {}, "next_decision_at": 0.0}
                            for w in ids
                            for j in range(NPCS_PER_WORLD)
                        ],
                    )
        finally:
            await store.dispose()

    asyncio.run(main())


def _rss_mib(pid: int) -> float:
    with Path(f"/proc/{pid}/status").open() as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run_one(url: str, worlds_count: int, settle_seconds: float, timeout: float) -> dict[str, Any]:
    """Start the daemon on a seeded database; measure until READY=1 and over ``settle_seconds`` after."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        notify_path = Path(tmp) / "notify.sock"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(notify_path))
        receiver.settimeout(0.5)
        config = Path(tmp) / "config.toml"
        port = _free_port()
        config.write_text(
            '[logging]\nformat = "json"\nlevel = "WARNING"\nactivity_summary_seconds = 0\n'
            f'[http]\nbind = "127.0.0.1"\nport = {port}\n[metrics]\nper_world = false\n',
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        env.update(SCHEDULER_DATABASE__URL=url, NOTIFY_SOCKET=str(notify_path), PYTHONPATH=str(ROOT))
        log_path = Path(tmp) / "daemon.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler_daemon", "--config", str(config), "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
            )
        extends, statuses, ready_at = 0, [], None
        try:
            while ready_at is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode}: {log_path.read_text()[-2000:]}")
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"no READY=1 within {timeout:g} s")
                try:
                    message = receiver.recv(4096).decode()
                except TimeoutError:
                    continue
                fields = dict(f.split("=", 1) for f in message.split("\n") if "=" in f)
                extends += "EXTEND_TIMEOUT_USEC" in fields
                if "STATUS" in fields and "READY" not in fields:
                    statuses.append(fields["STATUS"])
                if fields.get("READY") == "1":
                    ready_at = time.monotonic()
            rss_ready = _rss_mib(proc.pid)
            time.sleep(INTERVAL)  # first ticks come one interval after registration
            ticks_before, missed_before = (
                _metric(port, "worldsched_ticks_total"),
                _metric(port, "worldsched_ticks_missed_total"),
            )
            time.sleep(settle_seconds)
            ticks = _metric(port, "worldsched_ticks_total") - ticks_before
            missed = _metric(port, "worldsched_ticks_missed_total") - missed_before
            rss_settled = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            receiver.close()
    return {
        "worlds": worlds_count,
        "tick_interval_seconds": INTERVAL,
        "seconds_to_ready": round(ready_at - started, 2),
        "extend_timeout_messages": extends,
        "last_status_before_ready": statuses[-1] if statuses else None,
        "rss_mib_at_ready": round(rss_ready, 1),
        "rss_mib_after_settle": round(rss_settled, 1),
        "settle_seconds": settle_seconds,
        "ticks_per_s_after_ready": round(ticks / settle_seconds, 1),
        "ticks_per_s_expected": round(worlds_count / INTERVAL, 1),
        "missed_ticks_after_ready": int(missed),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(
    backends: Sequence[str], worlds_count: int, *, postgres_url: str | None, settle_seconds: float
) -> dict[str, Any]:
    """Each backend in turn on a fresh database; a missing PostgreSQL URL skips that backend and says so."""
    results: dict[str, Any] = {}
    for backend in backends:
        if backend == "postgresql" and not postgres_url:
            results[backend] = {"skipped": "no PostgreSQL URL"}
            continue
        with tempfile.TemporaryDirectory(prefix="bench-startup-db-") as tmp:
            url = (
                e2e.create_pg_database(postgres_url)
                if backend == "postgresql" and postgres_url
                else f"sqlite+aiosqlite:///{Path(tmp) / 'startup.db'}"
            )
            try:
                progress(f"startup {backend}: seeding {worlds_count} worlds × {NPCS_PER_WORLD} NPCs")
                seed(url, worlds_count)
                progress(f"startup {backend}: starting the daemon")
                results[backend] = run_one(url, worlds_count, settle_seconds, timeout=900.0)
                progress(f"startup {backend}: {results[backend]}")
            finally:
                if backend == "postgresql" and postgres_url:
                    e2e.drop_pg_database(postgres_url, url)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--worlds", type=int, default=10_000)
    parser.add_argument("--backend", default="sqlite,postgresql")
    parser.add_argument("--settle-seconds", type=float, default=30.0)
    parser.add_argument("--postgres-url", default=os.environ.get("SCHEDULER_TEST_POSTGRES_URL"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    results = run(backends, args.worlds, postgres_url=args.postgres_url, settle_seconds=args.settle_seconds)
    results["machine"] = {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
