"""Fault 11: admin writes racing each other on one world merge instead of failing.

Against the real daemon on both backends:

* 20 concurrent unconditional ``PUT …/scheduler/config`` of different fields
  (each a marker key; the config keeps unknown keys): every one answers 200
  and every marker is in the stored config, which went up one version per PUT;
* 60 pause/resume calls, alternating, 20 at a time: every one answers 200
  (idempotent, never 409), and the world ends in the state of the last call;
* ``If-Match`` with a stale ETag still answers 412 and changes nothing.

The tick audit runs at the end (the world ticks throughout).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    record_result,
    running_daemon,
    seed_worlds,
    utcnow,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

WORLD: dict[str, Any] = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
WRITERS = 20
TOGGLES = 60


def _stored(db: FaultDatabase, world_id: int) -> tuple[dict[str, Any], int]:
    meta, version = db.execute("SELECT meta, config_version FROM worlds WHERE id = :w", {"w": world_id})[0]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return meta["simulation"], int(version)


async def _burst(port: int, world_id: int) -> tuple[list[int], list[int], int]:
    base = f"http://127.0.0.1:{port}/api/v1/worlds/{world_id}/scheduler"
    limits = httpx.Limits(max_connections=WRITERS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        puts = await asyncio.gather(*(client.put(f"{base}/config", json={f"mark{i}": i}) for i in range(WRITERS)))
        semaphore = asyncio.Semaphore(WRITERS)

        async def toggle(i: int) -> int:
            async with semaphore:
                return (await client.post(f"{base}/{'pause' if i % 2 == 0 else 'resume'}")).status_code

        toggles = await asyncio.gather(*(toggle(i) for i in range(TOGGLES)))
        # Settle on a known state, then try a stale If-Match.
        final = (await client.post(f"{base}/resume")).status_code
        stale = await client.put(f"{base}/config", json={"lost": True}, headers={"If-Match": '"1"'})
    assert final == 200
    return [r.status_code for r in puts], list(toggles), stale.status_code


def test_concurrent_admin_writes_all_merge(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    (world,) = seed_worlds(db, 1, simulation=WORLD)
    other = seed_worlds(db, 1, simulation=WORLD, name="bystander")
    config = write_config(tmp_path / "config.toml", http={"bind": "127.0.0.1", "port": 0})
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        started = utcnow()
        port = daemon.http_port()
        wait_for_progress(db, [world, *other], timeout=60, what="first ticks")
        _, before = _stored(db, world)
        puts, toggles, stale = asyncio.run(_burst(port, world))
        simulation, after = _stored(db, world)
        wait_for_progress(db, [world, *other], timeout=30, what="ticks after the burst")
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert puts == [200] * WRITERS, puts
    assert toggles == [200] * TOGGLES, toggles
    assert stale == 412
    assert {f"mark{i}" for i in range(WRITERS)} <= set(simulation), simulation
    assert "lost" not in simulation
    assert simulation["pauseSimulation"] is False
    # One version per PUT; pause/resume bump only when they change something.
    assert after >= before + WRITERS
    report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in other}, restarts=[started])
    record_result(
        "admin-writes-merge",
        backend=db.backend,
        puts=WRITERS,
        toggles=TOGGLES,
        versions=after - before,
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)
