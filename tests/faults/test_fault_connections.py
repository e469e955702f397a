"""Fault 1: every database session of the daemon killed (``pg_terminate_backend``) mid-tick, repeatedly.

The daemon must stay up, ticks must resume within seconds of the last kill,
and the audit must show no committed tick lost or counted twice — including
when a kill lands during COMMIT, where the daemon cannot know whether its
tick committed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    install_slow_ticks,
    kill_daemon_sessions,
    pg_daemon_in_transaction,
    poll,
    profile,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

WORLD = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 2, Tier.AMBIENT: 2}
#: Ticks must be back this soon after the last kill (the daemon's backoff is capped below it).
RECOVERY_LIMIT_SECONDS = 10.0


def test_killed_connections_mid_tick_lose_nothing_and_ticks_resume(pg_fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = pg_fault_db
    kills = profile().connection_kills
    seed = int(os.environ.get("SCHEDULER_FAULTS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    worlds = seed_worlds(db, 4, simulation=WORLD, npcs_per_tier=NPCS)
    install_slow_ticks(db, seconds=0.05)
    config = write_config(tmp_path / "config.toml", scheduler={"backoff_max_seconds": 2.0})
    recovery = 0.0
    killed_sessions = mid_tick = 0
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        for _ in range(kills):
            time.sleep(rng.uniform(0.1, 0.8))  # a random point of the tick cycle
            mid_tick += pg_daemon_in_transaction(db)
            killed_sessions += kill_daemon_sessions(db)
            assert daemon.alive(), daemon.log_tail()
        killed_at = time.monotonic()
        wait_for_progress(db, worlds, timeout=RECOVERY_LIMIT_SECONDS + 20, what="ticks after the last kill")
        recovery = time.monotonic() - killed_at
        # A killed tick is re-run whole (transient error) and usually commits on
        # the next attempt, so a failed *attempt* is the evidence the kills hit
        # ticks; a tick failing all its attempts depends on kill timing.
        poll(
            lambda: daemon.events("tick failed") or daemon.events("tick failed, retrying"),
            timeout=5,
            what="the kills to fail ticks",
        )
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert killed_sessions >= kills, "the kills did not hit the daemon's sessions"

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(db, rules)
    record_result(
        "connections-killed",
        backend="postgres",
        iterations=kills,
        seed=seed,
        sessions_killed=killed_sessions,
        kills_mid_transaction=mid_tick,
        failed_ticks=len(daemon.events("tick failed")),
        failed_attempts=len(daemon.events("tick failed, retrying")),
        violations=len(report.violations),
        recovery_seconds=round(recovery, 2),
        summary=report.summary(),
    )
    assert report.violations == [], f"seed {seed}: " + "\n".join(report.violations)
    assert recovery <= RECOVERY_LIMIT_SECONDS, f"ticks resumed only {recovery:.1f}s after the last kill"
