"""Fault 4: one world hangs past the tick timeout, another raises; the rest keep their rate.

The raising world uses the fault plug-in behaviour (``tests.faults.plugins``):
its NPCs are renamed with the raise marker, so ``decide`` raises inside the
tick. The hanging world's tick blocks in the database (a trigger on its
``world_states`` row calls ``pg_sleep`` far past ``tick_timeout_seconds``).
That is the honest async-level hang: a behaviour plug-in is synchronous, so a
plug-in that sleeps would block the whole event loop, which no timeout can
interrupt (see ARCHITECTURE.md). SQLite has a single writer for the whole
file, so a hang there would stop every world by design: the hang is
PostgreSQL-only, the raising world runs on both backends.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants, check_rate
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    poll,
    record_result,
    running_daemon,
    seed_worlds,
    utcnow,
    wait_for_progress,
    write_config,
)
from tests.faults.plugins import RAISE_MARKER

pytestmark = pytest.mark.subprocess

NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 2}
HANG_SECONDS = 30.0  # far past the timeout: only cancelling the query frees the world
FAULT_SECONDS = 6.0
# Per backend: worlds, tick interval, tick timeout, and the longest pause allowed
# between two commits of a healthy world while the others fail. SQLite has one
# writer for the whole file and a coarse busy wait, so it gets fewer, slower
# worlds on a shared 2-core machine.
SHAPE = {"postgres": (6, 0.2, 1.0, 1.5), "sqlite": (4, 0.5, 3.0, 2.5)}
RECOVERY_LIMIT_SECONDS = 10.0


def _install_hang(db: FaultDatabase, world_id: int) -> None:
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION fault_hang_fn() RETURNS trigger AS $$ "
            f"BEGIN PERFORM pg_sleep({HANG_SECONDS}); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER fault_hang BEFORE UPDATE ON world_states FOR EACH ROW "
            f"WHEN (OLD.world_id = {world_id}) EXECUTE FUNCTION fault_hang_fn()"
        )


def _drop_hang(db: FaultDatabase) -> None:
    db.execute("DROP TRIGGER IF EXISTS fault_hang ON world_states")


def _set_raising(db: FaultDatabase, world_id: int, on: bool) -> None:
    if on:
        db.execute("UPDATE npcs SET name = :m || name WHERE world_id = :w", {"m": RAISE_MARKER, "w": world_id})
    else:
        db.execute(
            "UPDATE npcs SET name = substr(name, :n) WHERE world_id = :w AND name LIKE :p",
            {"n": len(RAISE_MARKER) + 1, "w": world_id, "p": RAISE_MARKER + "%"},
        )


def test_hung_and_raising_worlds_leave_the_others_at_their_rate(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    pg = db.backend == "postgres"
    count, interval, tick_timeout, max_gap = SHAPE[db.backend]
    world = {"timeScale": 600.0, "tickIntervalSeconds": interval, "maxCatchUpSeconds": 30.0}
    worlds = seed_worlds(db, count, simulation=world, npcs_per_tier=NPCS)
    raising, hung = worlds[0], (worlds[1] if pg else None)
    healthy = [w for w in worlds if w not in (raising, hung)]
    config = write_config(
        tmp_path / "config.toml", scheduler={"tick_timeout_seconds": tick_timeout, "backoff_max_seconds": 2.0}
    )
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        _set_raising(db, raising, True)
        if hung is not None:
            _install_hang(db, hung)
        fault_start = utcnow()
        poll(lambda: daemon.events("tick_failed"), timeout=10, what="the raising world to fail")
        if hung is not None:
            poll(lambda: daemon.events("tick_timed_out"), timeout=10, what="the hung world to time out")
        stuck_from = db.ticks()  # (a tick already in flight when the fault went on may still commit)
        # Keep the faults on for a while: the others must tick on as if nothing happened.
        time.sleep(max(0.0, FAULT_SECONDS - (utcnow() - fault_start).total_seconds()))
        fault_end = utcnow()
        during = db.ticks()
        _set_raising(db, raising, False)
        if hung is not None:
            _drop_hang(db)
        cleared = time.monotonic()
        wait_for_progress(
            db, [w for w in (raising, hung) if w is not None], timeout=RECOVERY_LIMIT_SECONDS + 30, what="recovery"
        )
        recovery = time.monotonic() - cleared
        wait_for_progress(db, worlds, timeout=30, what="every world ticking after recovery")
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    # The faulty worlds really did not commit while failing.
    assert during[raising] == stuck_from[raising]
    if hung is not None:
        assert during[hung] == stuck_from[hung]

    rules = {w: WorldRules(world["timeScale"], world["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(db, rules)
    gaps = check_rate(report, healthy, window=(fault_start, fault_end), max_gap_seconds=max_gap)
    errors = [e for e in daemon.events("tick_failed") if e.get("world_id") == raising]
    assert errors, "the raising world's failures are not logged with its world_id"
    assert "injected behaviour fault" in str(errors[0].get("exception", "")), errors[0]
    timed_out = [e for e in daemon.events("tick_timed_out") if e.get("world_id") == hung]
    others_failed = [e for e in daemon.events("tick_failed") + timed_out if e.get("world_id") in healthy]
    record_result(
        "hung-and-raising-worlds",
        backend=db.backend,
        fault_seconds=FAULT_SECONDS,
        raising_failures=len(errors),
        hung_timeouts=len(timed_out),
        healthy_longest_gap_seconds=round(max(gaps.values()), 3),
        violations=len(report.violations),
        recovery_seconds=round(recovery, 2),
        summary=report.summary(),
    )
    assert others_failed == []
    assert report.violations == [], "\n".join(report.violations)
    assert recovery <= RECOVERY_LIMIT_SECONDS, f"the faulty worlds recovered only after {recovery:.1f}s"
