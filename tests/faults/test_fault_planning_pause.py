"""Fault 1c: the daemon process pauses (a long garbage collection, the OS descheduling it) while planning a group.

A tick covers ``now − last_tick_at`` on the runner's monotonic clock, and its
``last_advanced_at`` is the wall time that world time corresponds to. Both
must come from the same moment: if the stamp is read later than the monotonic
start, a pause in between makes the stamp run ahead of the time the tick
covered, by the length of the pause, and the next tick's stamp interval falls
short by the same amount. The 30-minute soak saw exactly that once, for the
last worlds of one batch (0.195 s covered while the stamp moved 0.346 s, the
next tick compensating).

The fault plug-in (``tests.faults.plugins``) pauses the daemon's event-loop
thread on SIGUSR1, inside ``WorldScheduler.tick_worlds`` just before it plans
the third world of the next group, for longer than the audit's 0.1 s
tolerance. The audit then checks, tick by tick, that world time matches the
real time between the stamps.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    poll,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

WORLDS = 5
WORLD: dict[str, Any] = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
PAUSES = 3
PAUSE_SECONDS = 0.3  # three times the audit's tolerance


def _pauses(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def test_pause_while_planning_a_group_does_not_shift_tick_stamps(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    worlds = seed_worlds(db, WORLDS, simulation=WORLD, npcs_per_tier={Tier.DETAILED: 2})
    # A wide batch window, so the worlds tick as one group (see test_fault_grouped_write_kill.py).
    config = write_config(tmp_path / "config.toml", scheduler={"batch_window_seconds": 0.1})
    marker = tmp_path / "pauses.log"
    env = daemon_env(db.url, FAULT_PAUSE_FILE=str(marker), FAULT_PAUSE_SECONDS=str(PAUSE_SECONDS), FAULT_PAUSE_AT="3")
    with running_daemon(config, env, tmp_path / "daemon.log") as daemon:
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        for n in range(PAUSES):
            daemon.signal(signal.SIGUSR1)
            poll(lambda n=n: _pauses(marker) > n, timeout=10, what=f"pause {n + 1} inside the planning of a group")
            # The tick after the paused one is the one that would compensate.
            wait_for_progress(db, worlds, timeout=10, what=f"every world to tick after pause {n + 1}")
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(db, rules)
    record_result(
        "planning-paused",
        backend=db.backend,
        pauses=_pauses(marker),
        pause_seconds=PAUSE_SECONDS,
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)
