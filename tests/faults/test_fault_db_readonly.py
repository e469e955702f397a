"""Fault: the database stops accepting writes (a demoted primary), then accepts them again.

``ALTER DATABASE … SET default_transaction_read_only = on`` and the daemon's
sessions killed: every session the daemon opens afterwards is read-only, like
the connections a failover leaves on the old primary. No tick may commit, the
daemon must stay up, and ``/readyz`` must say 503 and name the failing ticks.
Then the setting is reset *without* killing anything: the daemon's pooled
sessions are still read-only (a ``SELECT 1`` pre-ping passes on them), so the
daemon has to notice by itself and reconnect. Ticks must resume within
``backoff_max_seconds`` plus a few seconds, ``/readyz`` must be 200 again, and
the audit must show no tick lost or applied twice. (The audit triggers write
too; only the daemon's sessions are read-only, the test's own are not.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    kill_daemon_sessions,
    pg_keep_test_sessions_writable,
    pg_set_default_read_only,
    poll,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

WORLD: dict[str, Any] = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 2, Tier.AMBIENT: 2}
BACKOFF_MAX = 2.0
#: Ticks must be back this soon after the reset: a backed-off world retries
#: within BACKOFF_MAX, and the retry reconnects; the rest is margin for a busy machine.
RECOVERY_LIMIT_SECONDS = BACKOFF_MAX + 6.0
#: Waited for the ticks to come back at all before calling it "never" (recorded, then asserted).
RECOVERY_WAIT_SECONDS = 30.0
#: ``/readyz`` pings with a 2 s timeout; under load allow a few probes either way.
READYZ_LIMIT_SECONDS = 20.0
#: While read-only, the ticks are watched this long (several backoff rounds) for a commit.
READ_ONLY_WATCH_SECONDS = 3 * BACKOFF_MAX


def _readyz(port: int) -> tuple[int, str]:
    """Status code and ``detail`` of ``/readyz`` (0 when it does not answer)."""
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        return r.status_code, str(r.json().get("detail"))
    except (httpx.HTTPError, ValueError):
        return 0, ""


def _seconds_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate()`` holds, or ``None`` if it did not within ``timeout``.

    A figure to record before asserting on it, so a failing run still reports
    how the daemon behaved in every phase.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start >= timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def test_read_only_database_is_not_ready_and_ticks_resume_without_killing_sessions(
    pg_fault_db: FaultDatabase, tmp_path: Path
) -> None:
    db = pg_fault_db
    pg_keep_test_sessions_writable(db)
    worlds = seed_worlds(db, 3, simulation=WORLD, npcs_per_tier=NPCS)
    config = write_config(
        tmp_path / "config.toml",
        scheduler={"backoff_max_seconds": BACKOFF_MAX},
        http={"bind": "127.0.0.1", "port": 0},
    )
    detail = ""

    def not_ready() -> bool:
        nonlocal detail
        code, detail = _readyz(port)
        return code == 503 and "ticks failing" in detail

    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        port = daemon.http_port()
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        poll(lambda: _readyz(port)[0] == 200, timeout=READYZ_LIMIT_SECONDS, what="/readyz 200 before the fault")
        try:
            pg_set_default_read_only(db, True)
            killed = kill_daemon_sessions(db)
            read_only_at = time.monotonic()
            not_ready_after = _seconds_until(not_ready, READYZ_LIMIT_SECONDS)
            # Taken once the killed sessions are surely gone (a COMMIT in flight at the kill may still land).
            frozen = db.ticks()
            watch_until = time.monotonic() + READ_ONLY_WATCH_SECONDS
            while time.monotonic() < watch_until:
                assert daemon.alive(), daemon.log_tail()
                assert db.ticks() == frozen, "a tick committed while the daemon's sessions were read-only"
                time.sleep(0.2)
            read_only_seconds = time.monotonic() - read_only_at
        finally:
            pg_set_default_read_only(db, False)  # and no session killed: the daemon must reconnect by itself
        recovery = _seconds_until(lambda: all(db.ticks()[w] > frozen[w] for w in worlds), RECOVERY_WAIT_SECONDS)
        ready_after = _seconds_until(lambda: _readyz(port)[0] == 200, READYZ_LIMIT_SECONDS)
        if recovery is not None:
            wait_for_progress(db, worlds, timeout=30, what="steady ticks after the reset")
        read_only_failures = [
            line
            for line in daemon.events("tick_failed") + daemon.events("retrying")
            if "read-only transaction" in json.dumps(line)
        ]
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(db, rules)
    record_result(
        "database-read-only",
        backend="postgres (default_transaction_read_only, reset without killing sessions)",
        sessions_killed=killed,
        read_only_seconds=round(read_only_seconds, 2),
        read_only_tick_failures=len(read_only_failures),
        readyz_503_after_seconds=None if not_ready_after is None else round(not_ready_after, 2),
        readyz_detail=detail,
        recovery_seconds="never" if recovery is None else round(recovery, 2),
        readyz_200_after_seconds=None if ready_after is None else round(ready_after, 2),
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert code == 0, daemon.log_tail()
    assert killed > 0, "the kill did not hit the daemon's sessions"
    assert read_only_failures, "no tick failed on the read-only database"
    assert not_ready_after is not None, f"/readyz never said 503 naming the failing ticks (last detail: {detail!r})"
    assert recovery is not None, f"ticks did not resume within {RECOVERY_WAIT_SECONDS:g}s of the reset"
    assert recovery <= RECOVERY_LIMIT_SECONDS, f"ticks resumed only {recovery:.1f}s after the reset"
    assert ready_after is not None, "/readyz did not say 200 again after the reset"
    assert report.violations == [], "\n".join(report.violations)
