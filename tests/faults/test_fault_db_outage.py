"""Fault 2: the database goes away (a private PostgreSQL cluster, crash-stopped) and comes back.

The daemon must stay up through the outage, tick again within seconds of the
database's return, lose no committed tick, and the first tick after the
outage may cover at most ``maxCatchUpSeconds`` of real time (the outage is
longer than that, so the cap is exercised, not just respected).
Generation requests claimed before and after the outage are all handed out,
none twice at once (a hand-off whose bookkeeping hit the outage is handed out
again after it). Downtime: ``SCHEDULER_FAULTS_OUTAGE_SECONDS`` (10 s in ``make test``, 30 s in ``make soak``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.conftest import _in_ci
from tests.faults.audit import WorldRules, check_generation, check_invariants, install_audit
from tests.faults.harness import (
    FaultDatabase,
    PrivatePostgres,
    daemon_env,
    libpq,
    poll,
    profile,
    record_result,
    requests_settled,
    running_daemon,
    seed_requests,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

CATCH_UP = 3.0
WORLD: dict[str, Any] = {
    "timeScale": 600.0,
    "tickIntervalSeconds": 0.2,
    "maxCatchUpSeconds": CATCH_UP,
    # One claim per tick: requests are still being claimed and handed off when the database goes.
    "maxJobOpsPerStep": 1,
    "generation": {"maxInFlightPerWorld": 100_000, "maxInFlightPerUser": 100_000},
}
NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 2}
BACKOFF_MAX = 3.0
RECOVERY_LIMIT_SECONDS = BACKOFF_MAX + 7.0


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    try:
        pg = PrivatePostgres().init()
        pg.start()
    except (RuntimeError, OSError) as exc:
        if _in_ci():
            pytest.fail(f"cannot start a private PostgreSQL cluster in CI: {exc}")
        pytest.skip(f"cannot start a private PostgreSQL cluster: {exc}")
    try:
        yield pg
    finally:
        pg.destroy()


def test_database_down_and_back_loses_nothing_and_caps_catch_up(private_pg: PrivatePostgres, tmp_path: Path) -> None:
    outage = profile().outage_seconds
    assert outage > CATCH_UP, "the outage must outlast maxCatchUpSeconds to exercise the cap"
    with psycopg.connect(libpq(private_pg.url), autocommit=True) as admin:
        admin.execute("CREATE DATABASE sched")
    db = FaultDatabase(private_pg.url.rsplit("/", 1)[0] + "/sched", "postgres")
    try:
        db.run(lambda store: store.upgrade())
        install_audit(db)
        worlds = seed_worlds(db, 3, simulation=WORLD, npcs_per_tier=NPCS)
        seed_requests(db, worlds, 40)
        config = write_config(
            tmp_path / "config.toml", scheduler={"backoff_max_seconds": BACKOFF_MAX}, recording_sink=True
        )
        sink = tmp_path / "sink.log"
        env = daemon_env(db.url, FAULT_SINK_FILE=str(sink))
        with running_daemon(config, env, tmp_path / "daemon.log") as daemon:
            wait_for_progress(db, worlds, timeout=60, what="first ticks")
            db.dispose()  # the test's own pooled connections die with the server too
            private_pg.stop("immediate")
            down_at = time.monotonic()
            while time.monotonic() - down_at < outage:
                assert daemon.alive(), daemon.log_tail()
                time.sleep(0.5)
            private_pg.start()
            up_at = time.monotonic()
            wait_for_progress(db, worlds, timeout=RECOVERY_LIMIT_SECONDS + 30, what="ticks after the outage")
            recovery = time.monotonic() - up_at
            wait_for_progress(db, worlds, timeout=30, what="steady ticks after the outage")
            seed_requests(db, worlds, 5)
            poll(lambda: requests_settled(db), timeout=60, what="every generation request handed off")
            assert daemon.events("tick_failed"), "the outage did not fail any tick"
            code = daemon.stop()
        assert code == 0, daemon.log_tail()
        rules = {w: WorldRules(WORLD["timeScale"], CATCH_UP) for w in worlds}
        report = check_invariants(db, rules)
        jobs = check_generation(
            db,
            report,
            sink,
            processes={daemon.pid: (daemon.started_at, daemon.stopped_at)},
            interrupted=daemon.handoffs_interrupted(),
        )
        capped = [
            r for w in worlds for r in report.ticks_by_world.get(w, []) if r.delta >= CATCH_UP * 600.0 * (1 - 1e-9)
        ]
        record_result(
            "database-outage",
            backend="postgres (private cluster, immediate stop)",
            outage_seconds=outage,
            generation=asdict(jobs),
            violations=len(report.violations),
            recovery_seconds=round(recovery, 2),
            capped_ticks=len(capped),
            summary=report.summary(),
        )
        assert report.violations == [], "\n".join(report.violations)
        assert {r.world_id for r in capped} == set(worlds), "the first tick after the outage was not capped"
        assert recovery <= RECOVERY_LIMIT_SECONDS, f"ticks resumed only {recovery:.1f}s after the database"
    finally:
        db.dispose()
