"""The default install (no ``postgres`` extra) runs on SQLite, and a postgresql URL names the extra.

Every command runs in a subprocess whose import hook refuses psycopg
(tests/support/without_psycopg.py): the migrations, the demo and the real
daemon ticking and serving must never need it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.process.test_daemon_world_time import ROOT, poll

pytestmark = pytest.mark.subprocess

WITHOUT_PSYCOPG = [sys.executable, str(ROOT / "tests" / "support" / "without_psycopg.py")]
EXTRA = "pip install 'scheduler-daemon[postgres]'"


def env_for(db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__BIND="127.0.0.1",
        SCHEDULER_HTTP__PORT="0",
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.5",
        PYTHONPATH=str(ROOT),
    )
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WITHOUT_PSYCOPG, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


def total_ticks(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COALESCE(SUM(ticks), 0) FROM world_states").fetchone()[0])


def listening_port(log: Path) -> int | None:
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "http_listening":
            return int(event["port"])
    return None


def test_the_daemon_migrates_seeds_ticks_and_serves_on_sqlite_without_psycopg(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    env = env_for(f"sqlite+aiosqlite:///{db}")
    for command in (["db", "upgrade"], ["demo"]):
        done = cli(*command, env=env)
        assert done.returncode == 0, done.stderr

    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*WITHOUT_PSYCOPG, "run"], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    try:
        port = poll(lambda: proc.poll() is None and listening_port(log), timeout=60, what="the HTTP port in the log")
        poll(lambda: total_ticks(db) >= 3, timeout=60, what="ticks committed to SQLite")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("command", [["check-config"], ["db", "upgrade"]])
def test_a_postgresql_url_without_psycopg_names_the_postgres_extra(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "postgresql://scheduler@127.0.0.1/worlds"\n')
    env = env_for("unused")
    del env["SCHEDULER_DATABASE__URL"]
    done = cli("--config", str(config), *command, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert str(config) in done.stderr
    assert "database.url" in done.stderr
    assert EXTRA in done.stderr
    assert "Traceback" not in done.stderr
