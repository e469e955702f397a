"""Fault 13: NPC and state rows corrupted under a running daemon.

While the daemon ticks, NPC rows are corrupted with plain SQL (``state`` that
is not an object or is over the size limit; on SQLite, which keeps any value
in any column, text in number columns) and one world's ``world_states`` row is
deleted. The daemon must:

* quarantine each corrupt NPC: never decide it, never rewrite it (its stored
  value is unchanged), log it once, count it in
  ``worldsched_quarantined_rows{table="npcs"}``, show it in ``worlds show``;
* keep deciding every healthy NPC and ticking every world;
* decide a quarantined NPC again once its row is fixed;
* recreate the deleted state row from the world's last committed clock, so
  that world's ticks go on from where they were.

The tick audit runs at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.base import MAX_NPC_STATE_BYTES
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    ROOT,
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

pytestmark = pytest.mark.subprocess

WORLD: dict[str, Any] = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
NPCS = {Tier.DETAILED: 4, Tier.ACTIVE: 4}


def _decisions(db: FaultDatabase, ids: list[int]) -> dict[int, int]:
    rows = db.execute(f"SELECT id, decisions FROM npcs WHERE id IN ({', '.join(map(str, ids))})")
    return {int(r[0]): int(r[1]) for r in rows}


def _raw(db: FaultDatabase, npc_id: int, column: str) -> Any:
    return db.execute(f"SELECT {column} FROM npcs WHERE id = :n", {"n": npc_id})[0][0]


def _quarantined_gauge(port: int) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r'^worldsched_quarantined_rows\{table="npcs"\} (\S+)$', text, re.M)
    return float(found[1]) if found else None


def test_corrupt_rows_are_quarantined_reported_and_released(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    worlds = seed_worlds(db, 3, simulation=WORLD, npcs_per_tier=NPCS)
    target, restored_world = worlds[0], worlds[1]
    npc_ids = [int(r[0]) for r in db.execute("SELECT id FROM npcs WHERE world_id = :w ORDER BY id", {"w": target})]
    cast = "CAST(:v AS jsonb)" if db.backend == "postgres" else ":v"
    corruptions: list[tuple[str, str, dict[str, Any]]] = [
        ("state", cast, {"v": json.dumps(["an", "array"])}),
        ("state", cast, {"v": json.dumps({"junk": "x" * (MAX_NPC_STATE_BYTES + 1)})}),
    ]
    if db.backend == "sqlite":
        corruptions += [
            ("energy", ":v", {"v": "exhausted"}),
            ("next_decision_at", ":v", {"v": "tomorrow"}),
            ("state", ":v", {"v": "{broken json"}),
        ]
    bad = npc_ids[: len(corruptions)]
    healthy = npc_ids[len(corruptions) :]
    config = write_config(
        tmp_path / "config.toml",
        scheduler={"tier_refresh_max_seconds": 1.0},
        http={"bind": "127.0.0.1", "port": 0},
    )
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        started = utcnow()
        port = daemon.http_port()
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        for npc_id, (column, value, params) in zip(bad, corruptions, strict=True):
            db.execute(f"UPDATE npcs SET {column} = {value} WHERE id = :n", {"n": npc_id, **params})
        stored = {npc_id: _raw(db, npc_id, column) for npc_id, (column, _, _) in zip(bad, corruptions, strict=True)}
        # Deleted under the running daemon: recreated from the world's last committed clock.
        db.execute("DELETE FROM world_states WHERE world_id = :w", {"w": restored_world})
        poll(lambda: _quarantined_gauge(port) == len(bad), timeout=30, what="every corrupt NPC to be quarantined")
        frozen_at = _decisions(db, bad)
        before = _decisions(db, healthy)
        poll(
            lambda: all(n > before[i] for i, n in _decisions(db, healthy).items()),
            timeout=60,
            what="the healthy NPCs to be decided again",
        )
        wait_for_progress(db, worlds, timeout=30, what="every world to keep ticking, the restored one too")
        assert _decisions(db, bad) == frozen_at, "a quarantined NPC was decided"
        for npc_id, (column, _, _) in zip(bad, corruptions, strict=True):
            assert _raw(db, npc_id, column) == stored[npc_id], f"npc {npc_id}: its {column} was rewritten"
        quarantined = {int(e["npc_id"]) for e in daemon.events("npc_quarantined")}
        assert quarantined == set(bad), quarantined
        assert len(daemon.events("npc_quarantined")) == len(bad), "logged more than once"
        assert daemon.events("world_state_row_recreated")
        shown = subprocess.run(
            [sys.executable, "-m", "scheduler_daemon", "--config", str(config), "worlds", "show", str(target)],
            env=daemon_env(db.url),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert set(map(int, json.loads(shown.stdout)["quarantinedNpcs"])) == set(bad)
        stats = httpx.get(f"http://127.0.0.1:{port}/api/v1/worlds/{target}/scheduler/stats", timeout=10).json()
        assert set(map(int, stats["quarantinedNpcs"])) == set(bad)

        # Fixed: released at the next tier assignment, decided again.
        fix = {"v": json.dumps({"fixed": True})}
        for npc_id, (column, _, _) in zip(bad, corruptions, strict=True):
            if column == "state":
                db.execute(f"UPDATE npcs SET state = {cast} WHERE id = :n", {"n": npc_id, **fix})
            else:
                db.execute(f"UPDATE npcs SET {column} = 0 WHERE id = :n", {"n": npc_id})
        fixed_at = time.monotonic()
        poll(
            lambda: all(n > frozen_at[i] for i, n in _decisions(db, bad).items()),
            timeout=60,
            what="the fixed NPCs to be decided again",
        )
        release = time.monotonic() - fixed_at
        assert _quarantined_gauge(port) == 0
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in worlds}, restarts=[started], rewritten_npcs=bad)
    record_result(
        "corrupt-rows",
        backend=db.backend,
        quarantined=len(bad),
        release_seconds=round(release, 2),
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)
