"""The real daemon with its HTTP server: scrape /metrics, steer a world, watch `top`.

Every daemon binds port 0 and the test reads the bound port from its JSON log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon import __version__
from tests.process.test_daemon_world_time import ROOT, cli, poll, sync_url

pytestmark = pytest.mark.subprocess

TOKEN = "proc-token-5f2e"


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    log: Path
    port: int
    token_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


def base_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__BIND="127.0.0.1",
        SCHEDULER_HTTP__PORT="0",
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.5",
        PYTHONPATH=str(ROOT),
    )
    return env


def start_daemon(env: dict[str, str], tmp_path: Path, notify: socket.socket) -> Daemon:
    """Start ``run`` with the token as a systemd credential; wait for READY=1 on ``notify``."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    token_file = creds / "admin-token"
    token_file.write_text(TOKEN + "\n")
    env = {**env, "CREDENTIALS_DIRECTORY": str(creds), "NOTIFY_SOCKET": notify.getsockname()}
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            cwd=ROOT,
        )
    daemon = Daemon(proc, log, 0, token_file)
    try:
        notify.settimeout(60)
        while "READY=1" not in notify.recv(65536).decode():
            pass
        # READY=1 comes only after the port is bound: the log already names it.
        daemon.port = next(int(e["port"]) for e in daemon.log_events() if e.get("event") == "http_listening")
    except BaseException:
        stop(daemon)
        raise
    return daemon


def stop(daemon: Daemon) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    return daemon.proc.returncode


def scrape(daemon: Daemon) -> dict[str, Any]:
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


@pytest.fixture
def seeded_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    from tests.process.test_daemon_world_time import _reset_pg

    _reset_pg(db_url)
    env = base_env(db_url, tmp_path)
    assert cli("db", "upgrade", env=env).returncode == 0
    seeded = cli("demo", env=env)
    assert seeded.returncode == 0, seeded.stderr
    return env


def test_metrics_move_with_ticks_and_a_put_applies_before_the_next_tick(
    seeded_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(sync_url(db_url))

    def state(world_id: int) -> tuple[float, int, float]:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT world_time, ticks, last_advanced_at FROM world_states WHERE world_id = :w"),
                {"w": world_id},
            ).one()
        last = row[2] if not isinstance(row[2], str) else datetime.fromisoformat(row[2])
        return float(row[0]), int(row[1]), last.timestamp() if last else 0.0

    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(short) / "notify.sock"))
        try:
            daemon = start_daemon(seeded_env, tmp_path, notify)
        finally:
            notify.close()
    try:
        with daemon.client() as api:
            assert httpx.get(f"{daemon.url}/readyz").status_code == 200
            assert httpx.get(f"{daemon.url}/healthz").json()["status"] == "ok"

            # --- metrics move as ticks happen
            first = poll(
                lambda: (
                    (f := scrape(daemon))
                    and sample(f, "worldsched_ticks", "worldsched_ticks_total", outcome="ok") >= 3
                    and f
                ),
                timeout=30,
                what="three ticks in the metrics",
            )
            assert sample(first, "worldsched_worlds", state="running") == 3
            assert sample(first, "worldsched_build_info", version=__version__) == 1
            assert sample(first, "worldsched_config_last_reload_successful") == 1
            assert "process_cpu_seconds" in first and "python_info" in first
            second = poll(
                lambda: (
                    (f := scrape(daemon))
                    and sample(f, "worldsched_ticks", "worldsched_ticks_total", outcome="ok")
                    >= sample(first, "worldsched_ticks", "worldsched_ticks_total", outcome="ok") + 3
                    and f
                ),
                timeout=30,
                what="more ticks",
            )
            assert sample(second, "worldsched_world_time_seconds", world_id="1") > sample(
                first, "worldsched_world_time_seconds", world_id="1"
            )
            assert sample(
                second, "worldsched_tick_duration_seconds", "worldsched_tick_duration_seconds_count"
            ) > sample(first, "worldsched_tick_duration_seconds", "worldsched_tick_duration_seconds_count")
            assert sum(s.value for s in second["worldsched_npc_ticks"].samples if s.name.endswith("_total")) > 0
            assert sample(second, "worldsched_world_ticks", "worldsched_world_ticks_total", world_id="1") >= 1
            assert sum(s.value for s in second["worldsched_npcs"].samples) > 0
            # The demo queues 8 generation requests per session (3 sessions); none is finished yet.
            queue = {s.labels["status"]: s.value for s in second["worldsched_jobs"].samples}
            assert set(queue) == {"pending", "enqueued", "running"}
            assert sum(queue.values()) == 24
            assert queue["enqueued"] > 0  # the ticks handed some out

            # --- the admin API needs the token; /metrics does not
            assert httpx.get(f"{daemon.url}/api/v1/worlds").status_code == 401
            worlds = api.get("/api/v1/worlds").json()["worlds"]
            assert {w["worldId"] for w in worlds} == {1, 2, 3}

            # --- a PUT takes effect before the world's next tick. Slow world 1
            # to one tick every 2 s, then change its speed right after a tick.
            assert api.put("/api/v1/worlds/1/scheduler/config", json={"tickIntervalSeconds": 2.0}).status_code == 200
            before = state(1)
            s0 = poll(lambda: (s := state(1))[1] > before[1] and s, timeout=10, interval=0.01, what="a tick")
            r = api.put("/api/v1/worlds/1/scheduler/config", json={"timeScale": 3600})
            put_at = time.time()
            assert r.status_code == 200 and r.json()["timeScale"] == 3600
            assert r.headers["etag"] == f'"{r.headers["etag"].strip(chr(34))}"'
            s1 = poll(lambda: (s := state(1))[1] > s0[1] and s, timeout=10, interval=0.01, what="the next tick")
            # The time before the PUT accrues at 60, everything after at 3600.
            # (last_advanced_at is each tick's start, so put_at - s0 is an upper
            # bound of the old-scale part; the tolerance covers it.)
            old_part = max(put_at - s0[2], 0.0)
            expected = 60 * old_part + 3600 * (s1[2] - s0[2] - old_part)
            # Tolerance: last_advanced_at is stamped a little after the runner's
            # tick start, which jitters by up to a few hundred ms on a loaded
            # machine; 0.5 s at the new speed still separates 60 from 3600 by far.
            jitter = 3600 * 0.5
            assert s1[0] - s0[0] == pytest.approx(expected, abs=jitter)
            assert s1[0] - s0[0] > 60 * (s1[2] - s0[2]) * 10  # clearly the new speed
            s2 = poll(lambda: (s := state(1))[1] > s1[1] and s, timeout=10, interval=0.01, what="another tick")
            assert s2[0] - s1[0] == pytest.approx(3600 * (s2[2] - s1[2]), abs=jitter)
            stats = api.get("/api/v1/worlds/1/scheduler/stats").json()
            assert stats["config"]["timeScale"] == 3600 and stats["configVersion"] == 3

            # --- top shows the worlds
            top = cli("top", "--once", "--url", daemon.url, "--token-file", str(daemon.token_file), env=seeded_env)
            assert top.returncode == 0, top.stderr
            lines = top.stdout.splitlines()
            assert lines[0].startswith(f"scheduler-daemon {daemon.url}") and "3 running" in lines[0]
            header = lines[2]
            assert header.split()[:4] == ["ID", "NAME", "STATE", "WORLD"]
            rows = {line.split()[0]: line for line in lines[3:]}
            assert set(rows) == {"1", "2", "3"}
            assert "running" in rows["1"] and "3600" in rows["1"] and "day " in rows["1"]
            denied = cli("top", "--once", "--url", daemon.url, env=seeded_env)
            assert denied.returncode == 1 and "401" in denied.stderr and "Traceback" not in denied.stderr

            # --- SIGHUP re-reads the token (here: the systemd credential file)
            daemon.token_file.write_text("rotated-token\n")
            daemon.proc.send_signal(signal.SIGHUP)
            poll(
                lambda: (
                    httpx.get(
                        f"{daemon.url}/api/v1/worlds", headers={"Authorization": "Bearer rotated-token"}
                    ).status_code
                    == 200
                ),
                timeout=15,
                what="the rotated token",
            )
            assert api.get("/api/v1/worlds").status_code == 401
    finally:
        code = stop(daemon)
        engine.dispose()
    assert code == 0, daemon.log.read_text()[-2000:]


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("scheduler-daemon: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_port_in_use_is_exit_5_with_one_line(tmp_path: Path) -> None:
    env = base_env(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path)
    (tmp_path / "admin-token").write_text(TOKEN)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        env.update(
            SCHEDULER_HTTP__PORT=str(holder.getsockname()[1]),
            SCHEDULER_HTTP__ADMIN_TOKEN_FILE=str(tmp_path / "admin-token"),
        )
        proc = cli("run", env=env)
    finally:
        holder.close()
    assert proc.returncode == 5, proc.stderr
    assert "address already in use" in _one_line_error(proc)


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path: Path) -> None:
    env = base_env(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path)
    env["SCHEDULER_HTTP__BIND"] = "0.0.0.0"
    proc = cli("run", env=env)
    assert proc.returncode == 2, proc.stderr
    line = _one_line_error(proc)
    assert "http.bind" in line and "admin token" in line


def test_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    env = base_env(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path)
    env["SCHEDULER_HTTP__ADMIN_TOKEN_FILE"] = str(tmp_path / "nope")
    proc = cli("run", env=env)
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path / "nope") in _one_line_error(proc)
