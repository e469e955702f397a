"""The real daemon as a subprocess: run, measure world time through the database, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+psycopg", "+psycopg")


def poll(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Bounded polling: return the first truthy value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def daemon_env(db_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__ENABLED="false",
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.5",
        PYTHONPATH=str(ROOT),
    )
    yield env


def _reset_pg(url: str) -> None:
    if url.startswith("postgresql"):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()


def test_unmigrated_database_is_refused_with_the_command_to_run(daemon_env: dict[str, str], db_url: str) -> None:
    _reset_pg(db_url)
    proc = cli("run", env=daemon_env)
    assert proc.returncode == 4, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "scheduler-daemon db upgrade" in last
    assert "Traceback" not in proc.stderr


def test_daemon_advances_world_time_by_elapsed_times_scale(daemon_env: dict[str, str], db_url: str) -> None:
    _reset_pg(db_url)
    assert cli("db", "upgrade", env=daemon_env).returncode == 0
    seeded = cli("demo", env=daemon_env)
    assert seeded.returncode == 0, seeded.stderr
    engine = sa.create_engine(sync_url(db_url))

    def state(world_id: int) -> tuple[float, int, datetime | None]:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT world_time, ticks, last_advanced_at FROM world_states WHERE world_id = :w"),
                {"w": world_id},
            ).one()
        last = row[2]
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        return float(row[0]), int(row[1]), last

    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler_daemon", "run"],
        env=daemon_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        first = poll(lambda: (s := state(1))[1] >= 2 and s, timeout=30, what="world 1 to tick twice")
        second = poll(lambda: (s := state(1))[1] >= first[1] + 4 and s, timeout=30, what="four more ticks")
        # Riverside runs at timeScale 60: world time between two commits equals
        # the wall time between them × 60 (tick start vs commit jitter is ms).
        elapsed = (second[2] - first[2]).total_seconds()
        advanced = second[0] - first[0]
        assert advanced == pytest.approx(elapsed * 60, rel=0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert '"event": "stopped"' in err
    # Restart resumes from the last committed tick: never backwards.
    final = state(1)
    assert final[0] >= second[0]
    engine.dispose()
