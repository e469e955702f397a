"""``scheduler-daemon run --workers 2``: a real supervisor and its two workers on a scratch PostgreSQL database.

One scenario walks the whole life of a box: both workers hold an even share
of the leases, the one port forwards world calls to the owner, ``/metrics``
is one exposition with both workers in it, SIGHUP reloads both, a SIGKILLed
worker is restarted while its worlds move and come back, SIGTERM stops all
and releases every lease; then the tick audit shows no tick committed twice.
TTL 3 s, discovery every 0.5 s, worlds tick every 0.5 s. Every wait is a
bounded poll.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.process.test_daemon_lifecycle import NotifySocket
from tests.process.test_metrics_process import OPENMETRICS, fetch, negotiated
from tests.support.cluster import ROOT, Cluster, poll
from tests.support.monitoring import check_against_scrape, monitoring_exprs, sample_kinds, selectors

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess]

WORLDS = 10
BASE = "box"
OWNERS = (f"{BASE}-w0", f"{BASE}-w1")


@pytest.fixture
def cluster(tmp_path: Path, pg_database_url: str) -> Iterator[Cluster]:
    c = Cluster(pg_database_url, tmp_path, ttl=3.0, discovery=0.5)
    try:
        c.reset(WORLDS, tick_interval=0.5)
        yield c
    finally:
        c.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    with tempfile.TemporaryDirectory(prefix="sdw-") as d:  # sun_path: 108 bytes at most
        sock = NotifySocket(Path(d))
        try:
            yield sock
        finally:
            sock.close()


TOKEN = "s3cret-token"


def config(path: Path, *, per_world: bool, scheduler: str = "") -> Path:
    token = path.parent / "admin-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    path.write_text(
        f'[http]\nport = 0\nadmin_token_file = "{token}"\n'
        f"[scheduler]\nlease_ttl_seconds = 3\ndiscovery_interval_seconds = 0.5\n{scheduler}"
        f'[logging]\nformat = "json"\nlevel = "INFO"\n[metrics]\nper_world = {str(per_world).lower()}\n'
    )
    return path


def environment(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "WATCHDOG_", "NOTIFY_SOCKET"))}
    env.update(SCHEDULER_DATABASE__URL=url, SCHEDULER_SCHEDULER__INSTANCE_ID=BASE, PYTHONPATH=str(ROOT), **extra)
    return env


def events(log: Path, event: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by SIGKILL
            if entry.get("event") == event:
                found.append(entry)
    return found


def scrape(client: httpx.Client) -> dict[str, list[Any]]:
    """``/metrics`` through the supervisor's port, parsed (it must be one valid exposition): samples by name."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def per_worker(samples: dict[str, list[Any]], name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def spread(cluster: Cluster) -> dict[str, int] | None:
    owners = cluster.owners()
    even = set(owners) == set(OWNERS) and sum(owners.values()) == WORLDS and max(owners.values()) == WORLDS // 2
    return dict(owners) if even else None


def test_two_workers_share_one_port_one_exposition_reload_restart_and_stop(
    cluster: Cluster, notify: NotifySocket, tmp_path: Path
) -> None:
    cfg = config(tmp_path / "config.toml", per_world=True)
    log = tmp_path / "box.log"
    with log.open("wb") as out:
        box = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "--config", str(cfg), "run", "--workers", "2"],
            # A 10 s watchdog: the supervisor feeds systemd's, each worker feeds the supervisor's.
            env=environment(cluster.url, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="10000000"),
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    try:
        port = poll(
            lambda: next((e["port"] for e in events(log, "http_listening") if "port" in e), None),
            timeout=30,
            what="the supervisor's port",
        )
        notify.wait_for("READY", after=0, timeout=60)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
        )

        # Both workers hold leases, five worlds each.
        poll(lambda: spread(cluster), timeout=30, what="five worlds per worker")
        assert client.get("/readyz").status_code == 200
        assert client.get("/healthz").json()["detail"] == "2 of 2 workers answering"

        # One exposition with both workers' ticks, and the supervisor's own series.
        def both_ticking() -> dict[str, list[Any]] | None:
            samples = scrape(client)
            ticks = per_worker(samples, "worldsched_ticks_total", outcome="ok")
            return samples if set(ticks) == {"0", "1"} and min(ticks.values()) > 0 else None

        samples = poll(both_ticking, timeout=30, what="ticks of both workers in /metrics")
        assert [s.value for s in samples["worldsched_workers"]] == [2]
        assert per_worker(samples, "worldsched_worker_up") == {"0": 1, "1": 1}
        assert per_worker(samples, "worldsched_leases_held") == {"0": 5, "1": 5}
        assert "supervisor" in per_worker(samples, "process_cpu_seconds_total")

        # The world list (top's source) is both workers' pages merged by id, a page at a time.
        listed, cursor = [], None
        while True:
            page = client.get("/api/v1/worlds", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            assert page["total"] == WORLDS
            listed += [row["worldId"] for row in page["worlds"]]
            if (cursor := page["nextCursor"]) is None:
                break
        assert listed == sorted(cluster.leases())
        assert client.get("/api/v1/worlds", params={"limit": 0}).status_code == 422

        # Every world's forced tick reaches its owner (a non-owner answers 404), paused and resumed.
        leases = cluster.leases()
        for world in sorted(leases):
            tick = client.post(f"/api/v1/worlds/{world}/scheduler/tick", json={"deltaSeconds": 1})
            assert tick.status_code == 200, (world, leases[world], tick.text)
        on_w1 = min(w for w, (owner, _) in leases.items() if owner == OWNERS[1])
        paused = client.post(f"/api/v1/worlds/{on_w1}/scheduler/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        stats = client.get(f"/api/v1/worlds/{on_w1}/scheduler/stats")
        assert stats.status_code == 200 and stats.json()["state"] == "paused"
        assert client.post(f"/api/v1/worlds/{on_w1}/scheduler/resume").status_code == 200
        # Status codes and the worker's own checks (token, validation, body limit) come through unchanged.
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/worlds/{on_w1}/scheduler/stats").status_code == 401
        assert client.get("/api/v1/worlds/999999/scheduler/stats").status_code == 404
        assert client.post(f"/api/v1/worlds/{on_w1}/scheduler/tick", json={"deltaSeconds": -1}).status_code == 422
        assert client.put(f"/api/v1/worlds/{on_w1}/scheduler/config", content=b"x" * 70_000).status_code == 413

        # SIGHUP with an invalid file: refused by the supervisor, not forwarded.
        config(cfg, per_world=False, scheduler="max_batch_size = 0\n")
        mark = notify.mark()
        box.send_signal(signal.SIGHUP)
        _, refused = notify.wait_for("READY", after=mark)
        assert "reload failed" in refused["STATUS"] and "max_batch_size" in refused["STATUS"]
        reload_ok = per_worker(scrape(client), "worldsched_config_last_reload_successful")
        assert reload_ok == {"0": 1, "1": 1, "supervisor": 0}
        assert [e.get("worker") for e in events(log, "config_reloading")] == [None]

        # SIGHUP: the supervisor checks the file and both workers reload (per-world series switched off).
        reloaded_before = per_worker(samples, "worldsched_config_last_reload_success_timestamp_seconds")
        config(cfg, per_world=False)
        mark = notify.mark()
        box.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", after=mark)
        notify.wait_for("READY", after=mark)

        def reloaded() -> bool:
            now = scrape(client)
            stamps = per_worker(now, "worldsched_config_last_reload_success_timestamp_seconds")
            return all(stamps.get(w, 0) > reloaded_before[w] for w in ("0", "1")) and not any(
                "world_id" in s.labels for series in now.values() for s in series
            )

        poll(reloaded, timeout=30, what="both workers to reload")
        assert set(per_worker(scrape(client), "worldsched_config_last_reload_successful").values()) == {1}

        # SIGKILL worker 1: restarted and counted; its worlds tick on worker 0 meanwhile, then come back.
        pid = next(e["pid"] for e in events(log, "worker_started") if e["worker"] == "1")
        ticks_at_kill = cluster.world_ticks()
        os.kill(pid, signal.SIGKILL)
        # Not ready while a worker is missing (restarting takes its backoff plus a start); alive all along.
        missing = poll(
            lambda: (r := client.get("/readyz")).status_code == 503 and r.json(),
            timeout=10,
            what="readiness to fail while worker 1 is away",
        )
        assert "worker 1" in missing["detail"]
        assert client.get("/healthz").json()["status"] == "ok"
        poll(
            lambda: per_worker(scrape(client), "worldsched_worker_restarts_total").get("1") == 1,
            timeout=30,
            what="the restart counter",
        )
        exited = events(log, "worker_exited")
        assert exited and exited[0]["exit_status"] == "killed by SIGKILL"
        poll(
            lambda: all(n > ticks_at_kill[w] + 2 for w, n in cluster.world_ticks().items()),
            timeout=30,
            what="every world to keep ticking",
        )
        poll(lambda: spread(cluster), timeout=30, what="the restarted worker to get its five worlds back")
        poll(lambda: client.get("/readyz").status_code == 200, timeout=30, what="readiness with both workers")

        assert notify.count("WATCHDOG") >= 1
        assert events(log, "worker_watchdog_timeout") == []
        poll(
            lambda: any("2/2 workers ready, 1 restarts; w0: " in m.get("STATUS", "") for m in notify.snapshot()),
            timeout=15,
            what="STATUS= showing both workers and the restart",
        )

        # SIGTERM: everyone stops cleanly and every lease is released.
        box.send_signal(signal.SIGTERM)
        assert box.wait(timeout=60) == 0
        assert cluster.owners() == {}
    finally:
        if box.poll() is None:
            box.kill()
            box.wait()

    # No tick committed twice: per world, the audited tick numbers are 1…n and n is world_states.ticks.
    committed: dict[int, list[int]] = {}
    for world, n, _, owner, _, _ in cluster.audit():
        assert owner in OWNERS
        committed.setdefault(world, []).append(n)
    final = cluster.world_ticks()
    for world, numbers in committed.items():
        assert numbers == list(range(1, len(numbers) + 1)) and final[world] == len(numbers), world


def test_a_worker_failing_at_start_ends_the_supervisor_with_its_exit_code(pg_scratch_url: str) -> None:
    # The database is not migrated: each worker exits 4 at start, and so does the supervisor.
    done = subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", "run", "--workers", "2"],
        env=environment(pg_scratch_url, SCHEDULER_HTTP__PORT="0", SCHEDULER_LOGGING__FORMAT="json"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 4, done.stderr[-2000:]
    assert "worker_start_failed" in done.stderr
    assert "scheduler-daemon db upgrade" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--workers", "2"], {}, "--workers 2: 2 workers share the worlds through PostgreSQL leases"),
        ([], {"SCHEDULER_SCHEDULER__WORKERS": "3"}, "scheduler.workers (3): 3 workers share the worlds"),
        (["--workers", "0"], {}, "argument --workers: expected 1 … 64 workers, got 0"),
        (["--workers", "abc"], {}, "argument --workers: expected a number of workers, got 'abc'"),
        ([], {"SCHEDULER_SCHEDULER__WORKERS": "65"}, "scheduler.workers: Input should be less than or equal to 64"),
    ],
)
def test_bad_worker_counts_are_refused_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", "run", *args],
        env=environment(sqlite, **env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_check_config_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path / "s.db"}"\n[scheduler]\nworkers = 2\n')
    done = subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", "check-config", str(cfg)],
        env=environment(f"sqlite+aiosqlite:///{tmp_path / 's.db'}"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert f"{cfg}: scheduler.workers: 2 workers share the worlds through PostgreSQL leases" in done.stderr


def start_box(cluster: Cluster, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``run --workers 2`` on the cluster's database with its output in a JSON log."""
    cfg = config(tmp_path / "config.toml", per_world=False)
    log = tmp_path / "box.log"
    with log.open("wb") as out:
        box = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "--config", str(cfg), "run", "--workers", "2"],
            env=environment(cluster.url, **env),
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    return box, log


def box_port(log: Path) -> int:
    port: int = poll(
        lambda: next((e["port"] for e in events(log, "http_listening") if "port" in e), None),
        timeout=30,
        what="the supervisor's port",
    )
    poll(lambda: any("workers" in e for e in events(log, "ready")), timeout=60, what="the supervisor's readiness")
    return port


def worker_pids(log: Path) -> dict[str, int]:
    return {e["worker"]: e["pid"] for e in events(log, "worker_started")}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_box(box: subprocess.Popen[bytes]) -> None:
    """SIGTERM, so the workers stop and release their leases (a SIGKILL leaves them running a while)."""
    if box.poll() is None:
        box.send_signal(signal.SIGTERM)
        try:
            box.wait(timeout=60)
        except subprocess.TimeoutExpired:
            box.kill()
            box.wait()


def test_workers_stop_when_the_supervisor_is_killed_while_they_start(cluster: Cluster, tmp_path: Path) -> None:
    box, log = start_box(cluster, tmp_path)
    pids: list[int] = []
    try:
        poll(lambda: len(worker_pids(log)) == 2, timeout=30, what="both workers started")
        pids = list(worker_pids(log).values())
        # SIGKILL before the workers are up (they take seconds to import): nobody will stop them but themselves.
        box.kill()
        box.wait()
        poll(lambda: not any(alive(p) for p in pids), timeout=30, what="the orphaned workers to stop")
        assert cluster.owners() == {}
    finally:
        stop_box(box)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_hung_worker_does_not_take_the_ports_own_answers_down(cluster: Cluster, tmp_path: Path) -> None:
    box, log = start_box(cluster, tmp_path, SCHEDULER_HTTP__REQUEST_TIMEOUT_SECONDS="4")
    hung = None
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{box_port(log)}", timeout=15)
        hung = worker_pids(log)["1"]
        os.kill(hung, signal.SIGSTOP)  # its event loop stands still, as a blocked one would
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["detail"] == "1 of 2 workers answering"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "worker 1" in ready.json()["detail"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and 'worldsched_leases_held{worker="0"}' in metrics.text
    finally:
        if hung is not None:
            os.kill(hung, signal.SIGCONT)
        stop_box(box)


def test_sighup_while_the_workers_start_reports_ready_only_when_they_are(
    cluster: Cluster, notify: NotifySocket, tmp_path: Path
) -> None:
    box, log = start_box(cluster, tmp_path, NOTIFY_SOCKET=notify.path)
    try:
        poll(lambda: len(worker_pids(log)) == 2, timeout=30, what="both workers started")
        box.send_signal(signal.SIGHUP)  # the supervisor's handler is in place: the workers are starting
        _, ready = notify.wait_for("READY", after=0, timeout=60)
        assert ready["STATUS"].startswith("2/2 workers ready"), ready
        poll(
            lambda: [e["workers"] for e in events(log, "config_reload_forwarded")] == [2],
            timeout=30,
            what="the reload to reach both workers once they are ready",
        )
        box.send_signal(signal.SIGTERM)
        assert box.wait(timeout=60) == 0
    finally:
        stop_box(box)


def raw_exchange(port: int, request: bytes, *, timeout: float = 15) -> bytes:
    """Send ``request`` as is and read until the port closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_the_port_answers_what_a_single_daemon_answers(cluster: Cluster, tmp_path: Path) -> None:
    box, log = start_box(cluster, tmp_path)
    try:
        port = box_port(log)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=15, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        # A limit the workers accept (pydantic takes 3.0 for 3) is one the merge takes too.
        page = client.get("/api/v1/worlds", params={"limit": "3.0"})
        assert page.status_code == 200 and len(page.json()["worlds"]) == 3
        # A GET with a body: a worker reads it as on its own port (the merge asks them without one).
        with_body = client.request(
            "GET", "/api/v1/worlds", content=b'{"a": 1}', headers={"Content-Type": "application/json"}
        )
        assert with_body.status_code == 200, with_body.text
        # The world list's refusal is the worker's, headers included (a 401 names its scheme).
        # The worker sees the client's Host: its redirects lead back to this port.
        slash = client.get("/api/v1/worlds/")
        assert slash.status_code == 307 and slash.headers["location"] == f"http://127.0.0.1:{port}/api/v1/worlds"
        refused = httpx.get(f"http://127.0.0.1:{port}/api/v1/worlds")
        assert refused.status_code == 401 and refused.headers.get("www-authenticate") == "Bearer"
        # Transfer-Encoding and Content-Length both: the chunked body is the body (RFC 9112 §6.3).
        world = min(cluster.leases())
        body = b'{"deltaSeconds": 1}'
        answer = raw_exchange(
            port,
            b"POST /api/v1/worlds/%d/scheduler/tick HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (world, TOKEN.encode(), len(body), body),
        )
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    finally:
        stop_box(box)


def test_merged_metrics_negotiate_format_and_gzip_and_satisfy_the_dashboard_and_alerts(
    cluster: Cluster, tmp_path: Path
) -> None:
    box, log = start_box(cluster, tmp_path)  # [metrics] per_world = false
    try:
        url = f"http://127.0.0.1:{box_port(log)}"

        def both_ticking() -> list[Any] | None:
            families = negotiated(url)  # each format and encoding, no _created series
            workers = {s.labels["worker"] for f in families if f.name == "worldsched_ticks" for s in f.samples}
            return families if {"0", "1"} <= workers else None

        families = poll(both_ticking, timeout=30, what="both workers' ticks in /metrics")
        assert [s for f in families for s in f.samples if "world_id" in s.labels] == []
        assert {s.labels.get("worker") for f in families for s in f.samples} == {"0", "1", "supervisor", None}
        assert {f.name for f in families for s in f.samples if "worker" not in s.labels} == {"worldsched_workers"}
        om = openmetrics_families(fetch(url, Accept=OPENMETRICS).body.decode())
        types = {f.name: f.type for f in om}
        assert types["worldsched_ticks"] == "counter" and types["worldsched_tick_lag_seconds"] == "histogram"
        # Every metric a panel or alert reads, the supervisor's included, with functions fit for its type.
        kinds = sample_kinds(families)
        problems = [
            f"{where}: {problem}"
            for where, expr in monitoring_exprs()
            for sel in selectors(expr)
            for problem in check_against_scrape(sel, kinds)
        ]
        assert problems == []
    finally:
        stop_box(box)


def test_stop_kills_workers_that_hang_after_one_grace_for_all(cluster: Cluster, tmp_path: Path) -> None:
    # Grace: tick_timeout_seconds (1) + STOP_GRACE_SECONDS (15), shared by every worker.
    box, log = start_box(cluster, tmp_path, SCHEDULER_SCHEDULER__TICK_TIMEOUT_SECONDS="1")
    pids: list[int] = []
    try:
        box_port(log)
        pids = list(worker_pids(log).values())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # neither will ever act on SIGTERM
        started = time.monotonic()
        box.send_signal(signal.SIGTERM)
        assert box.wait(timeout=60) == 1
        assert time.monotonic() - started < 16 + 6
        assert len(events(log, "worker_stop_timeout")) == 2
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_box(box)


def test_a_workers_request_for_more_start_up_time_reaches_systemd(
    cluster: Cluster, notify: NotifySocket, tmp_path: Path
) -> None:
    box, log = start_box(cluster, tmp_path, NOTIFY_SOCKET=notify.path)
    try:
        poll(lambda: len(worker_pids(log)) == 2, timeout=30, what="both workers started")
        runtime = Path(events(log, "workers_starting")[0]["runtime_dir"])
        # What worker 0 sends while its first discovery registers many worlds (daemon._serving).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=registering worlds: 250/10000", str(runtime / "w0.notify"))
        _, extend = notify.wait_for("EXTEND_TIMEOUT_USEC", after=0, timeout=30)
        assert extend["EXTEND_TIMEOUT_USEC"] == "30000000" and "w0: registering worlds: 250/10000" in extend["STATUS"]
        notify.wait_for("READY", after=0, timeout=60)
    finally:
        stop_box(box)
