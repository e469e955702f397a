"""Fault 8: soak (``make soak``, not in CI): resident memory and open file descriptors stay flat.

Runs the daemon for ``SCHEDULER_FAULTS_SOAK_MINUTES`` (30 in the soak
profile) against PostgreSQL with killed connections every minute, sampling
``/proc/PID`` every few seconds, then checks the audit invariants too.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    kill_daemon_sessions,
    profile,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

WORLD = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak_memory_and_fds_stay_flat(pg_fault_db: FaultDatabase, tmp_path: Path) -> None:
    minutes = profile().soak_minutes
    if minutes <= 0:
        pytest.skip("the soak runs in `make soak` (SCHEDULER_FAULTS_PROFILE=soak)")
    db = pg_fault_db
    worlds = seed_worlds(db, 20, simulation=WORLD, npcs_per_tier={Tier.DETAILED: 5, Tier.AMBIENT: 20})
    config = write_config(tmp_path / "config.toml", scheduler={"backoff_max_seconds": 2.0})
    samples: list[tuple[float, int, int]] = []
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        start = time.monotonic()
        next_kill = start + 60
        while time.monotonic() - start < minutes * 60:
            assert daemon.alive(), daemon.log_tail()
            samples.append(
                (time.monotonic() - start, _rss_kib(daemon.pid), len(list(Path(f"/proc/{daemon.pid}/fd").iterdir())))
            )
            if time.monotonic() >= next_kill:
                kill_daemon_sessions(db)
                next_kill += 60
            time.sleep(5)
        wait_for_progress(db, worlds, timeout=30, what="ticks at the end")
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    third = max(len(samples) // 3, 1)
    first, last = samples[:third], samples[-third:]
    rss_first, rss_last = statistics.median(s[1] for s in first), statistics.median(s[1] for s in last)
    # Open fds: medians, and the last third against the middle one. Pooled
    # connections come and go with load, and the pool opens its connections
    # lazily during the first minutes (soak runs saw 15 -> 18 and 21 -> 24
    # from the first third to the last); a leak keeps growing after that.
    middle = samples[third:-third] or samples
    fd_first, fd_mid, fd_last = (statistics.median(s[2] for s in part) for part in (first, middle, last))
    report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in worlds})
    record_result(
        "soak",
        minutes=minutes,
        rss_kib_first_third=rss_first,
        rss_kib_last_third=rss_last,
        fds_first_third=fd_first,
        fds_middle_third=fd_mid,
        fds_last_third=fd_last,
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)
    assert rss_last <= rss_first * 1.10 + 4096, f"RSS grew from {rss_first} KiB to {rss_last} KiB"
    assert fd_last <= fd_mid + 2, f"open fds kept growing: {fd_first} -> {fd_mid} -> {fd_last} (medians by third)"
