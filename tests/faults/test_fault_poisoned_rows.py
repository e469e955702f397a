"""Fault 10: one poisoned row must stay with its row (discovery, listings, failover).

Worlds whose stored ``meta`` has a bad value where a query over many worlds
reads it (``meta.simulation.alwaysOn`` of every JSON type but boolean, a
``simulation`` or ``meta`` that is not an object, ``meta`` that is not JSON at
all on SQLite, a ``meta`` over the size limit) are written straight into the
table, bypassing every validation. The daemon must:

* keep every healthy world ticking and still start worlds created later;
* isolate each poisoned world: logged once with world and field, listed by
  ``GET /api/v1/worlds`` and ``scheduler-daemon worlds list`` with the reason,
  counted in ``worldsched_worlds{state="isolated"}``;
* pick a world up again once its row is fixed (a plain SQL ``UPDATE`` of
  ``meta``, without touching ``config_version``);
* on PostgreSQL with two daemons, still fail over: the survivor takes over the
  worlds of a daemon killed with SIGKILL.

The tick audit runs at the end.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.store.base import MAX_WORLD_META_BYTES
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    ROOT,
    DaemonProcess,
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

#: label -> (stored meta as JSON text, words the isolation reason must contain).
POISON: dict[str, tuple[str, tuple[str, ...]]] = {
    "alwaysOn-string": (json.dumps({"simulation": {"alwaysOn": "yes"}}), ("alwaysOn",)),
    "alwaysOn-integer": (json.dumps({"simulation": {"alwaysOn": 1}}), ("alwaysOn",)),
    "alwaysOn-float": (json.dumps({"simulation": {"alwaysOn": 1.5}}), ("alwaysOn",)),
    "alwaysOn-array": (json.dumps({"simulation": {"alwaysOn": [True]}}), ("alwaysOn",)),
    "alwaysOn-object": (json.dumps({"simulation": {"alwaysOn": {"on": True}}}), ("alwaysOn",)),
    "simulation-string": (json.dumps({"simulation": "always"}), ("simulation",)),
    "simulation-array": (json.dumps({"simulation": [True]}), ("simulation",)),
    "meta-array": (json.dumps([{"simulation": {"alwaysOn": True}}]), ("meta",)),
    "meta-string": (json.dumps("alwaysOn"), ("meta",)),
    "meta-number": ("42", ("meta",)),
    "meta-too-large": (
        json.dumps({"simulation": {"alwaysOn": True}, "notes": "x" * (MAX_WORLD_META_BYTES + 1)}),
        ("meta", "larger than"),
    ),
}
#: SQLite only (jsonb cannot hold it): text that is not JSON at all.
NOT_JSON = ('{"simulation": {"alwaysOn": true', ("meta", "JSON"))


def _insert_poison(db: FaultDatabase, cases: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, int]:
    """Each case as a world of its own, its meta written as raw text (no validation on the way in)."""
    cast = "CAST(:m AS jsonb)" if db.backend == "postgres" else ":m"
    ids = {}
    for label, (raw, _) in cases.items():
        rows = db.execute(
            f"INSERT INTO worlds (name, meta) VALUES (:n, {cast}) RETURNING id", {"n": f"poison-{label}", "m": raw}
        )
        ids[label] = int(rows[0][0])
    return ids


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def _isolated_count(port: int) -> float | None:
    found = re.search(r'^worldsched_worlds\{state="isolated"\} (\S+)$', _get(port, "/metrics").text, re.M)
    return float(found[1]) if found else None


def _cli(db: FaultDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", *args],
        env=daemon_env(db.url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_poisoned_rows_are_isolated_and_nothing_else_stops(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    healthy = seed_worlds(db, 2, simulation=WORLD, npcs_per_tier=None)
    cases = dict(POISON)
    if db.backend == "sqlite":
        cases["not-json"] = NOT_JSON
    poisoned = _insert_poison(db, cases)
    config = write_config(tmp_path / "config.toml", http={"bind": "127.0.0.1", "port": 0})
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        started = utcnow()
        port = daemon.http_port()
        wait_for_progress(db, healthy, timeout=60, what="healthy worlds to tick next to the poisoned rows")

        def listed() -> dict[int, dict[str, Any]] | None:
            answer = _get(port, "/api/v1/worlds?limit=1000")
            assert answer.status_code == 200, answer.text
            worlds = {int(w["worldId"]): w for w in answer.json()["worlds"]}
            return worlds if all(w in worlds for w in poisoned.values()) else None

        worlds = poll(listed, timeout=30, what="every poisoned world to be listed")
        problems = []
        for label, world_id in poisoned.items():
            entry = worlds[world_id]
            reason = str(entry.get("lastError") or "")
            if not entry.get("isolated") or entry.get("state") != "isolated":
                problems.append(f"{label}: listed as {entry}")
            for word in (f"world {world_id}", *cases[label][1]):
                if word not in reason:
                    problems.append(f"{label}: {word!r} missing from the reason {reason!r}")
        assert problems == [], "\n".join(problems)
        poll(lambda: _isolated_count(port) == len(poisoned), timeout=20, what="the isolated-worlds gauge")

        # A world created now still starts.
        late = int(db.run(lambda store: store.create_world("late", simulation={"alwaysOn": True, **WORLD})))
        wait_for_progress(db, [late], timeout=30, what="a world created after the poisoned rows to tick")

        # Operators' tools work next to the poison.
        listing = _cli(db, "--config", str(config), "worlds", "list")
        assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
        for label, world_id in poisoned.items():
            line = next((ln for ln in listing.stdout.splitlines() if ln.split()[:1] == [str(world_id)]), "")
            assert "invalid" in line, f"{label}: worlds list says {line!r}"
        shown = _cli(db, "--config", str(config), "worlds", "show", str(poisoned["meta-array"]))
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert "meta" in json.loads(shown.stdout)["problem"]

        # Fixed with plain SQL (config_version untouched): ticks again.
        fixed = poisoned["alwaysOn-string"]
        cast = "CAST(:m AS jsonb)" if db.backend == "postgres" else ":m"
        db.execute(
            f"UPDATE worlds SET meta = {cast} WHERE id = :w",
            {"m": json.dumps({"simulation": {"alwaysOn": True, **WORLD}}), "w": fixed},
        )
        fixed_at = time.monotonic()
        wait_for_progress(db, [fixed], timeout=30, what="the fixed world to tick")
        recovery = time.monotonic() - fixed_at
        wait_for_progress(db, healthy, timeout=20, what="healthy worlds to keep ticking")
        # Logged once per world, however many discovery passes saw it.
        isolations: dict[int, int] = {}
        for event in daemon.events("world_isolated"):
            isolations[int(event["world_id"])] = isolations.get(int(event["world_id"]), 0) + 1
        assert all(isolations.get(w) == 1 for w in poisoned.values()), isolations
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in [*healthy, late, fixed]}, restarts=[started])
    record_result(
        "poisoned-rows",
        backend=db.backend,
        poisoned_worlds=len(poisoned),
        recovery_seconds=round(recovery, 2),
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)


@pytest.mark.postgres
def test_poisoned_rows_do_not_stop_failover(pg_fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = pg_fault_db
    healthy = seed_worlds(db, 6, simulation=WORLD)
    _insert_poison(db, POISON)
    env = daemon_env(db.url)
    daemons = []
    for name in ("a", "b"):
        config = write_config(
            tmp_path / f"{name}.toml", scheduler={"instance_id": f"poison-{name}", "lease_ttl_seconds": 2.0}
        )
        daemons.append(DaemonProcess(config, env, tmp_path / f"{name}.log").start())
    a, b = daemons
    try:
        started = utcnow()
        wait_for_progress(db, healthy, timeout=60, what="healthy worlds to tick under two daemons")

        def owners() -> dict[int, str | None]:
            rows = db.execute("SELECT world_id, lease_owner FROM world_states WHERE world_id = ANY(:w)", {"w": healthy})
            return {int(r[0]): r[1] for r in rows}

        # The poisoned worlds are leased and isolated like any others, so one
        # daemon may hold every healthy world: kill whichever holds the first one.
        owner = poll(lambda: owners().get(healthy[0]), timeout=30, what="a lease on the first healthy world")
        victim, survivor = (a, b) if owner == "poison-a" else (b, a)
        victim.signal(signal.SIGKILL)
        assert victim.proc is not None
        victim.proc.wait(timeout=30)
        killed_at, killed_wall = time.monotonic(), utcnow()
        poll(
            lambda: set(owners().values()) == {"poison-b" if survivor is b else "poison-a"},
            timeout=30,
            what="the survivor to take over every healthy world",
        )
        wait_for_progress(db, healthy, timeout=30, what="every healthy world to tick after the failover")
        takeover = time.monotonic() - killed_at
        assert survivor.alive(), survivor.log_tail()
        assert survivor.stop() == 0, survivor.log_tail()
    finally:
        for d in daemons:
            d.kill()
    # A taken-over world's first tick covers the time since its new owner took it, not the gap.
    report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in healthy}, restarts=[started, killed_wall])
    record_result("poisoned-rows-failover", backend="postgres", takeover_seconds=round(takeover, 2))
    assert report.violations == [], "\n".join(report.violations)
