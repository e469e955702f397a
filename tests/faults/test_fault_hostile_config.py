"""Fault 5: hostile daemon config at start and on SIGHUP, hostile world configs in the database.

At start: a clear one-line error naming the file and key, exit code 2, never a
traceback. On SIGHUP: the running config stays in force (proved by the audit:
the world keeps ticking at the old timeScale) and the reason is logged.
In the database: only the broken world is isolated, with a message naming
it and the field; every other world ticks on, and the broken one comes back
when its config is fixed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler_daemon.store.repository import Store
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

GOOD = '[logging]\nformat = "json"\n[http]\nenabled = false\n'

#: (name, file content or None for "missing", words the error must contain)
HOSTILE_FILES: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("invalid-toml", GOOD + "[scheduler\nmax_concurrent_ticks = 4\n", ("invalid TOML",)),
    ("wrong-type", GOOD + '[scheduler]\nmax_concurrent_ticks = "many"\n', ("scheduler.max_concurrent_ticks",)),
    ("out-of-range", GOOD + "[scheduler]\ntick_timeout_seconds = -1\n", ("scheduler.tick_timeout_seconds",)),
    ("nan", GOOD + "[scheduler]\ntick_timeout_seconds = nan\n", ("scheduler.tick_timeout_seconds",)),
    ("unknown-key", GOOD + "[scheduler]\ntick_timout_seconds = 5\n", ("scheduler.tick_timout_seconds", "unknown key")),
    ("bad-world-default", GOOD + "[defaults.simulation]\ntimeScale = 1e308\n", ("defaults.simulation", "timeScale")),
    ("missing", None, ("config file not found",)),
    ("ten-megabytes", GOOD + ("# " + "x" * 1022 + "\n") * 10240, ("larger than",)),
    ("not-utf8", GOOD + "# \udcff\n", ("UTF-8",)),
]


def _write(path: Path, content: str | None) -> Path:
    if content is not None:
        path.write_bytes(content.encode("utf-8", errors="surrogateescape"))
    return path


def test_hostile_config_files_at_start_exit_2_with_file_and_key(tmp_path: Path) -> None:
    env = daemon_env(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    procs = {}
    for name, content, _ in HOSTILE_FILES:  # all at once: each costs an interpreter start
        path = _write(tmp_path / f"{name}.toml", content)
        procs[name] = (
            path,
            subprocess.Popen(
                [sys.executable, "-m", "scheduler_daemon", "--config", str(path), "run"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    problems = []
    try:
        for name, _, words in HOSTILE_FILES:
            path, proc = procs[name]
            _out, err = proc.communicate(timeout=120)
            lines = err.strip().splitlines()
            if proc.returncode != 2 or "Traceback" in err or len(lines) != 1:
                problems.append(f"{name}: exit {proc.returncode}, stderr:\n{err[-1500:]}")
                continue
            line = lines[0]
            for word in (str(path), *words):
                if word not in line:
                    problems.append(f"{name}: {word!r} missing from {line!r}")
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert problems == [], "\n".join(problems)


def test_hostile_config_on_sighup_keeps_the_running_config(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fault.db'}"
    db = FaultDatabase(url, "sqlite")
    try:
        from tests.faults.audit import install_audit

        db.run(lambda store: store.upgrade())
        install_audit(db)
        world = {"tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
        worlds = seed_worlds(db, 2, simulation=world)
        config = tmp_path / "config.toml"
        good = write_config(config, extra="[defaults.simulation]\ntimeScale = 600.0\n").read_text()
        with running_daemon(config, daemon_env(url), tmp_path / "daemon.log") as daemon:
            wait_for_progress(db, worlds, timeout=60, what="first ticks")
            for name, content, words in HOSTILE_FILES:
                failed_before = len(daemon.events("config_reload_failed"))
                if content is None:
                    config.unlink()
                else:
                    # Each hostile file also tries to change the time scale: it must not leak through.
                    sneak = (
                        "" if "[defaults.simulation]" in content else "\n[defaults.simulation]\ntimeScale = 1200.0\n"
                    )
                    _write(config, content + sneak)
                daemon.signal(signal.SIGHUP)
                events = poll(
                    lambda n=failed_before: daemon.events("config_reload_failed")[n:],
                    timeout=20,
                    what=f"the {name} reload to be refused",
                )
                error = str(events[0].get("error", ""))
                for word in words:
                    assert word in error, (name, error)
                assert daemon.alive(), daemon.log_tail()
                config.write_text(good)
            wait_for_progress(db, worlds, timeout=20, what="ticks after the refused reloads")
            # A valid reload still works afterwards.
            daemon.signal(signal.SIGHUP)
            poll(lambda: daemon.events("config_reloaded"), timeout=20, what="a good reload")
            wait_for_progress(db, worlds, timeout=20, what="ticks after the good reload")
            code = daemon.stop()
        assert code == 0, daemon.log_tail()
        # Every committed tick ran at the original timeScale 600: nothing of a refused file applied.
        report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in worlds})
        record_result(
            "hostile-config-sighup",
            backend="sqlite",
            iterations=len(HOSTILE_FILES),
            violations=len(report.violations),
            summary=report.summary(),
        )
        assert report.violations == [], "\n".join(report.violations)
    finally:
        db.dispose()


#: (label, raw meta JSON text, words the isolation message must contain). The
#: first is not JSON at all (SQLite only: PostgreSQL's jsonb cannot hold it).
HOSTILE_WORLDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("invalid-json", '{"simulation": {"alwaysOn": true, "timeScale": 6', ("meta",)),
    ("wrong-type", json.dumps({"simulation": {"alwaysOn": True, "timeScale": "fast"}}), ("simulation.timeScale",)),
    ("huge-scale", json.dumps({"simulation": {"alwaysOn": True, "timeScale": 1e308}}), ("simulation.timeScale",)),
    ("nan", '{"simulation": {"alwaysOn": true, "timeScale": "NaN"}}', ("simulation.timeScale",)),
    (
        "negative-interval",
        json.dumps({"simulation": {"alwaysOn": True, "tickIntervalSeconds": -1}}),
        ("simulation.tickIntervalSeconds",),
    ),
    (
        "negative-tier-interval",
        json.dumps({"simulation": {"alwaysOn": True, "tiers": {"detailed": {"decisionIntervalSeconds": -5}}}}),
        ("simulation.tiers.detailed.decisionIntervalSeconds",),
    ),
    ("not-an-object", json.dumps({"simulation": [1, 2, 3]}), ("simulation",)),
]


def test_hostile_world_configs_isolate_only_that_world(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    world = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
    healthy = seed_worlds(db, 2, simulation=world)
    cases = [c for c in HOSTILE_WORLDS if db.backend == "sqlite" or c[0] != "invalid-json"]
    hostile = seed_worlds(db, len(cases), simulation=world, name="hostile")

    async def add_sessions(store: Store) -> None:  # so even unreadable configs are discovered
        for w in hostile:
            await store.add_session(w, f"user-{w}")

    db.run(add_sessions)
    if db.backend == "sqlite":
        # Not JSON and no session: discovery must still find every other world.
        unreadable = seed_worlds(db, 1, simulation=world, name="unreadable")[0]
        db.execute("UPDATE worlds SET meta = '{\"simulation\": {' WHERE id = :w", {"w": unreadable})
    for world_id, (_, raw, _) in zip(hostile, cases, strict=True):
        # Raw text straight into the column, bypassing every validation on the way in.
        cast = "CAST(:m AS jsonb)" if db.backend == "postgres" else ":m"
        db.execute(
            f"UPDATE worlds SET meta = {cast}, config_version = config_version + 1 WHERE id = :w",
            {"m": raw, "w": world_id},
        )
    config = write_config(tmp_path / "config.toml")
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        window_start = utcnow()
        wait_for_progress(db, healthy, timeout=60, what="healthy worlds to tick")
        isolated = poll(
            lambda: (
                found
                if len(found := {e.get("world_id"): e for e in daemon.events("world_isolated")}) >= len(hostile)
                else None
            ),
            timeout=30,
            what="every hostile world to be isolated",
        )
        problems = []
        for world_id, (label, _, words) in zip(hostile, cases, strict=True):
            error = str(isolated.get(world_id, {}).get("error", ""))
            for word in (f"world {world_id}", *words):
                if word not in error:
                    problems.append(f"{label}: {word!r} missing from {error!r}")
        assert problems == [], "\n".join(problems)
        t0 = time.monotonic()
        wait_for_progress(db, healthy, timeout=20, what="healthy worlds to keep ticking")
        assert all(db.ticks()[w] == 0 for w in hostile), "a hostile world ticked"
        # Fixing a world's config brings it back on the next discovery.
        fixed = hostile[0]
        db.execute(
            "UPDATE worlds SET meta = "
            + ("CAST(:m AS jsonb)" if db.backend == "postgres" else ":m")
            + ", config_version = config_version + 1 WHERE id = :w",
            {"m": json.dumps({"simulation": {"alwaysOn": True, **world}}), "w": fixed},
        )
        fixed_at = time.monotonic()
        wait_for_progress(db, [fixed], timeout=30, what="the fixed world to tick")
        recovery = time.monotonic() - fixed_at
        assert daemon.alive()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert time.monotonic() - t0 > 0
    rules = {w: WorldRules(600.0, 30.0) for w in [*healthy, fixed]}
    report = check_invariants(db, rules, restarts=[window_start])
    record_result(
        "hostile-world-configs",
        backend=db.backend,
        iterations=len(cases),
        violations=len(report.violations),
        recovery_seconds=round(recovery, 2),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)


def _status(port: int, token: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"http://127.0.0.1:{port}/api/v1/worlds", headers=headers, timeout=10).status_code


def _reload_gauge(port: int) -> float:
    import re

    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r"^worldsched_config_last_reload_successful (\S+)$", text, re.M)
    assert found, "reload gauge missing"
    return float(found[1])


def test_a_reload_that_would_weaken_security_is_refused(tmp_path: Path) -> None:
    """A half-written file without ``[http]`` (the token would be gone) or with another bind: refused, old kept."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'fault.db'}"
    db = FaultDatabase(url, "sqlite")
    try:
        from tests.faults.audit import install_audit

        db.run(lambda store: store.upgrade())
        install_audit(db)
        world = {"tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0, "timeScale": 600.0}
        worlds = seed_worlds(db, 1, simulation=world)
        token = tmp_path / "admin-token"
        token.write_text("s3cret\n")
        token.chmod(0o644)  # readable by others: warned about
        config = tmp_path / "config.toml"
        http = {"bind": "127.0.0.1", "port": 0, "admin_token_file": str(token)}
        good = write_config(config, http=http).read_text()
        config.chmod(0o666)  # writable by others: warned about
        refusals = "config_reload_failed"
        with running_daemon(config, daemon_env(url), tmp_path / "daemon.log") as daemon:
            port = daemon.http_port()
            wait_for_progress(db, worlds, timeout=60, what="first ticks")
            warnings = {e["event"] for e in daemon.log_lines() if e.get("level") == "warning"}
            assert "config_file_writable_by_others" in warnings, warnings
            assert "admin_token_file_readable_by_others" in warnings, warnings
            assert _status(port, None) == 401 and _status(port, "s3cret") == 200
            cases = [
                ("no-http-section", good.split("[http]")[0], ("admin token",)),
                ("token-removed", good.replace(f'admin_token_file = "{token}"', ""), ("admin token",)),
                ("other-bind", good.replace('bind = "127.0.0.1"', 'bind = "127.0.0.2"'), ("http.bind", "restart")),
            ]
            for name, content, words in cases:
                before = len(daemon.events(refusals))
                config.write_text(content)
                daemon.signal(signal.SIGHUP)
                events = poll(
                    lambda n=before: daemon.events(refusals)[n:], timeout=20, what=f"the {name} reload to be refused"
                )
                error = str(events[0].get("error", ""))
                for word in words:
                    assert word in error, (name, error)
                assert _status(port, None) == 401, f"{name}: the API answered without a token"
                assert _status(port, "s3cret") == 200
                assert _reload_gauge(port) == 0.0
            config.write_text(good)
            daemon.signal(signal.SIGHUP)
            poll(lambda: _reload_gauge(port) == 1.0, timeout=20, what="a good reload")
            wait_for_progress(db, worlds, timeout=20, what="ticks after the reloads")
            code = daemon.stop()
        assert code == 0, daemon.log_tail()
        report = check_invariants(db, {w: WorldRules(600.0, 30.0) for w in worlds})
        record_result("reload-security", backend="sqlite", violations=len(report.violations))
        assert report.violations == [], "\n".join(report.violations)
    finally:
        db.dispose()
