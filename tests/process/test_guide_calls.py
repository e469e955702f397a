"""The original deployment guide's curl calls, verbatim, against the real daemon (both backends).

The daemon runs without an admin token (loopback only, as the guide's calls
send none), on a port the test reads from its log. Also here: a pause answers
with the time the world stays at, checked many times against the daemon's own
loop with short tick intervals.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.process.test_daemon_world_time import ROOT, poll
from tests.process.test_http_process import Daemon, base_env, stop
from tests.support.seeding import WorldStates, migrate, seed_world

pytestmark = pytest.mark.subprocess


def start_open_daemon(env: dict[str, str], tmp_path: Path) -> Daemon:
    """``run`` without an admin token; returns once READY=1, with the bound port."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(short) / "notify.sock"))
        log = tmp_path / "daemon.log"
        try:
            with log.open("w") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "scheduler_daemon", "run"],
                    env={**env, "NOTIFY_SOCKET": notify.getsockname()},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    text=True,
                    cwd=ROOT,
                )
            daemon = Daemon(proc, log, 0, tmp_path / "no-token")
            try:
                notify.settimeout(60)
                while "READY=1" not in notify.recv(65536).decode():
                    pass
                daemon.port = next(int(e["port"]) for e in daemon.log_events() if e.get("event") == "http_listening")
            except BaseException:
                stop(daemon)
                raise
        finally:
            notify.close()
    return daemon


def curl(*args: str) -> tuple[int, Any]:
    """Run curl with the guide's arguments; returns the status and the JSON body."""
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.fixture
def daemon(db_url: str, tmp_path: Path) -> Any:
    migrate(db_url)
    ids = {
        "guide": seed_world(db_url, name="guide", simulation={"timeScale": 60}),
        # Paused and resumed over and over; the witness's ticks show the loop moving on.
        "paused": seed_world(
            db_url, name="paused", simulation={"timeScale": 600, "tickIntervalSeconds": 0.02, "maxCatchUpSeconds": 1}
        ),
        "witness": seed_world(
            db_url, name="witness", simulation={"timeScale": 600, "tickIntervalSeconds": 0.02, "maxCatchUpSeconds": 1}
        ),
    }
    assert ids["guide"] == 1  # the guide's calls name world 1
    daemon = start_open_daemon(base_env(db_url, tmp_path), tmp_path)
    states = WorldStates(db_url)
    try:
        yield daemon, ids, states
    finally:
        code = stop(daemon)
        states.close()
        assert code == 0, daemon.log.read_text()[-3000:]


def test_the_guides_curl_calls_work_verbatim(daemon: Any) -> None:
    d, ids, states = daemon
    base = f"http://localhost:{d.port}/api/v1/worlds/1/scheduler"
    poll(lambda: states(ids["guide"])[1] >= 1, timeout=30, what="the first tick")

    status, config = curl("-X", "GET", f"{base}/config")
    assert status == 200 and config["timeScale"] == 60
    status, config = curl(
        "-X", "PUT", f"{base}/config", "-H", "Content-Type: application/json", "-d", '{"timeScale": 120}'
    )
    assert status == 200 and config["timeScale"] == 120
    # No -H: curl sends application/x-www-form-urlencoded; the body is JSON and read as such.
    status, config = curl("-X", "PUT", f"{base}/config", "-d", '{"maxNpcTicksPerStep": 25, "tickIntervalSeconds": 2.0}')
    assert status == 200, config
    assert (config["maxNpcTicksPerStep"], config["tickIntervalSeconds"], config["timeScale"]) == (25, 2.0, 120)
    status, stats = curl("-X", "GET", f"{base}/stats")
    assert status == 200 and stats["config"]["tickIntervalSeconds"] == 2.0 and stats["configVersion"] == 3

    status, paused = curl("-X", "POST", f"{base}/pause")
    assert status == 200 and paused["paused"] is True
    assert states(ids["guide"])[0] == paused["worldTime"]  # committed at the pause
    status, resumed = curl("-X", "POST", f"{base}/resume")
    assert status == 200 and resumed == {"worldId": 1, "paused": False, "worldTime": paused["worldTime"]}

    # Another declared type is refused, saying what to send; nothing is written.
    status, refused = curl("-X", "PUT", f"{base}/config", "-H", "Content-Type: text/plain", "-d", '{"timeScale": 1}')
    assert status == 415 and "Content-Type: application/json" in refused["detail"]
    status, refused = curl("-X", "PUT", f"{base}/config", "-d", "timeScale=1")
    assert status == 415 and "not JSON" in refused["detail"]
    assert curl("-X", "GET", f"{base}/config")[1]["timeScale"] == 120


def test_pause_answers_with_the_time_the_world_stays_at(daemon: Any) -> None:
    d, ids, states = daemon
    paused, witness = ids["paused"], ids["witness"]
    poll(lambda: states(paused)[1] >= 3, timeout=30, what="the world ticking")
    with httpx.Client(base_url=f"{d.url}/api/v1/worlds/{paused}/scheduler", timeout=10) as api:
        for _ in range(15):
            r = api.post("/pause")
            assert r.status_code == 200, r.text
            answered = r.json()["worldTime"]
            at_pause = states(paused)
            assert at_pause[0] == answered
            # More than two of the world's tick intervals pass: the witness ticks three more times.
            seen = states(witness)[1]
            poll(lambda seen=seen: states(witness)[1] >= seen + 3, timeout=30, interval=0.01, what="witness ticks")
            assert states(paused) == at_pause  # no tick moved or wrote it
            stats = api.get("/stats").json()
            assert stats["currentWorldTime"] == answered and stats["ticksProcessed"] == at_pause[1]
            assert api.post("/resume").json()["worldTime"] == answered
            poll(lambda t=at_pause[1]: states(paused)[1] > t, timeout=30, interval=0.005, what="a tick after resume")
