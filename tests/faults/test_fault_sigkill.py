"""Fault 3: SIGKILL of the daemon at random moments, then restart.

Each tick's transaction is slowed in the database so most kills land inside
an open tick (NPC rows written, clock not yet committed). After every
restart world time must resume from the last committed tick: the audit shows
one unbroken chain per world, no tick covers the downtime, every NPC decision
committed with its tick. The test keeps adding generation requests: a kill
between a hand-off and its bookkeeping must lead to the request being handed
out again by the next daemon (at least once), never lost, never by two at once.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_generation, check_invariants
from tests.faults.harness import (
    DaemonProcess,
    FaultDatabase,
    daemon_env,
    install_slow_ticks,
    pg_daemon_in_transaction,
    poll,
    profile,
    record_result,
    requests_settled,
    seed_requests,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

WORLD: dict[str, Any] = {
    "timeScale": 600.0,
    "tickIntervalSeconds": 0.2,
    "maxCatchUpSeconds": 30.0,
    "maxJobOpsPerStep": 2,
    "generation": {"maxInFlightPerWorld": 100_000, "maxInFlightPerUser": 100_000},
}
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
    config = write_config(tmp_path / "config.toml", recording_sink=True)
    sink = tmp_path / "sink.log"
    env = daemon_env(fault_db.url, FAULT_SINK_FILE=str(sink))
    log = tmp_path / "daemon.log"
    starts = []
    daemons: list[DaemonProcess] = []
    mid_transaction = 0
    recoveries = []
    for i in range(iterations):
        seed_requests(fault_db, worlds, 3)
        daemon = DaemonProcess(config, env, log).start()
        daemons.append(daemon)
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
    daemons.append(daemon)
    assert daemon.started_at is not None
    starts.append(daemon.started_at)
    try:
        recoveries.append(wait_for_progress(fault_db, worlds, timeout=60, what="ticks after the last restart"))
        poll(lambda: all(n >= 3 for n in fault_db.ticks().values()), timeout=30, what="a few ticks")
        poll(lambda: requests_settled(fault_db), timeout=60, what="every generation request handed off")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(fault_db, rules, restarts=starts)
    processes: dict[int, tuple[datetime | None, datetime | None]] = {
        d.pid: (d.started_at, d.stopped_at) for d in daemons
    }
    jobs = check_generation(fault_db, report, sink, processes=processes, interrupted=daemon.handoffs_interrupted())
    record_result(
        "sigkill",
        backend=fault_db.backend,
        iterations=iterations,
        seed=seed,
        killed_mid_transaction=mid_transaction if fault_db.backend == "postgres" else None,
        generation=asdict(jobs),
        violations=len(report.violations),
        recovery_seconds_max=round(max(recoveries), 2),
        summary=report.summary(),
    )
    assert report.violations == [], f"seed {seed}: " + "\n".join(report.violations)
    assert all(report.ticks[w] > 0 for w in worlds)
