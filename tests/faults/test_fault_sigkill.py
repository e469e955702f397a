"""Fault 3: SIGKILL of the daemon at random moments, then restart.

Each tick's transaction is slowed in the database so most kills land inside
an open tick (NPC rows written, clock not yet committed). After every
restart world time must resume from the last committed tick: the audit shows
one unbroken chain per world, no tick covers the downtime, every NPC decision
committed with its tick.
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
    DaemonProcess,
    FaultDatabase,
    daemon_env,
    install_slow_ticks,
    pg_daemon_in_transaction,
    poll,
    profile,
    record_result,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

WORLD = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 3, Tier.AMBIENT: 2, Tier.DORMANT: 2}


def test_sigkill_at_random_moments_resumes_from_the_last_committed_tick(
    fault_db: FaultDatabase, tmp_path: Path
) -> None:
    iterations = profile().sigkill_iterations
    seed = int(os.environ.get("SCHEDULER_FAULTS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    worlds = seed_worlds(fault_db, 3, simulation=WORLD, npcs_per_tier=NPCS)
    # SQLite burns CPU for its slowness (no sleep there): keep it small on a 2-core machine.
    install_slow_ticks(fault_db, seconds=0.05 if fault_db.backend == "postgres" else 0.015)
    config = write_config(tmp_path / "config.toml")
    env = daemon_env(fault_db.url)
    log = tmp_path / "daemon.log"
    starts = []
    mid_transaction = 0
    recoveries = []
    for i in range(iterations):
        daemon = DaemonProcess(config, env, log).start()
        assert daemon.started_at is not None
        starts.append(daemon.started_at)
        try:
            if i == 0 or rng.random() < 0.75:
                # Kill while it ticks: after its first commit, at a random point of the tick cycle.
                recoveries.append(wait_for_progress(fault_db, worlds, timeout=60, what=f"ticks after restart {i}"))
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                # Kill at a random moment of startup (connect, schema check, registration).
                time.sleep(rng.uniform(0.2, 2.5))
            if fault_db.backend == "postgres" and pg_daemon_in_transaction(fault_db):
                mid_transaction += 1
            assert daemon.alive(), f"daemon died on its own (seed {seed}):\n{daemon.log_tail()}"
        finally:
            daemon.kill()
    # A last, clean run must pick every world up again and stop cleanly.
    daemon = DaemonProcess(config, env, log).start()
    assert daemon.started_at is not None
    starts.append(daemon.started_at)
    try:
        recoveries.append(wait_for_progress(fault_db, worlds, timeout=60, what="ticks after the last restart"))
        poll(lambda: all(n >= 3 for n in fault_db.ticks().values()), timeout=30, what="a few ticks")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(fault_db, rules, restarts=starts)
    record_result(
        "sigkill",
        backend=fault_db.backend,
        iterations=iterations,
        seed=seed,
        killed_mid_transaction=mid_transaction if fault_db.backend == "postgres" else None,
        violations=len(report.violations),
        recovery_seconds_max=round(max(recoveries), 2),
        summary=report.summary(),
    )
    assert report.violations == [], f"seed {seed}: " + "\n".join(report.violations)
    assert all(report.ticks[w] > 0 for w in worlds)
