"""The ARQ sink end to end: a real daemon, real Redis, a real ARQ worker that reports back over the admin API.

Each test runs the daemon (``scheduler-daemon run``) with ``generation.sink =
"scheduler_daemon.sinks.arq:enqueue"`` on its own queue and job id prefix, and
the worker of :mod:`tests.support.arq_worker`, which records every job it runs
and completes the request through ``POST /api/v1/generation/{id}/complete``.
"Exactly once" is checked on what the worker ran and on what is left in Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler_daemon import generation
from scheduler_daemon.store.repository import Store
from tests.conftest import TABLES_IN_DELETE_ORDER
from tests.process.test_daemon_world_time import ROOT, poll, sync_url
from tests.support.arq_redis import ArqNamespace, RedisServer, start_worker, stop_process

pytestmark = pytest.mark.subprocess

TOKEN = "arq-sink-token-3d1a"
ARQ_SINK = "scheduler_daemon.sinks.arq:enqueue"
#: Fast ticks and hand-off retries, so a test waits on Redis and the worker, not on the world.
SIMULATION = {
    "timeScale": 60,
    "tickIntervalSeconds": 0.2,
    "generation": {"maxAttempts": 50, "retryBackoffSeconds": 0.05},
}


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str


@dataclass
class World:
    world_id: int
    session_id: int


async def _seed(url: str) -> World:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        if store.dialect == "postgresql":
            async with store.transaction() as conn:
                await conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES_IN_DELETE_ORDER)} RESTART IDENTITY CASCADE"))
        world_id = await store.create_world("arq", simulation=SIMULATION)
        return World(world_id, await store.add_session(world_id, "alice"))
    finally:
        await store.dispose()


async def _create_request(url: str, world: World) -> int:
    store = Store.from_url(url)
    try:
        return await generation.create_request(store, world.world_id, world.session_id, "portrait", {"style": "oil"})
    finally:
        await store.dispose()


def seed(url: str) -> tuple[World, int]:
    """A world with a player session and one pending generation request."""
    world = asyncio.run(_seed(url))
    return world, asyncio.run(_create_request(url, world))


@pytest.fixture
def namespace(redis_url: str) -> Iterator[ArqNamespace]:
    ns = ArqNamespace(redis_url)
    yield ns
    ns.cleanup()


@pytest.fixture
def rows(db_url: str) -> Iterator[Any]:
    """``rows(request_id)``: the request's ``(status, handed_off, attempts, last_error)`` read from the database."""
    engine = sa.create_engine(sync_url(db_url))

    def row(request_id: int) -> tuple[str, bool, int, str | None]:
        with engine.connect() as conn:
            r = conn.execute(
                sa.text("SELECT status, handed_off, attempts, last_error FROM generation_requests WHERE id = :id"),
                {"id": request_id},
            ).one()
        return str(r[0]), bool(r[1]), int(r[2]), r[3]

    yield row
    engine.dispose()


def daemon_env(db_url: str, tmp_path: Path, namespace: ArqNamespace, *, sink: str = ARQ_SINK) -> dict[str, str]:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__BIND="127.0.0.1",
        SCHEDULER_HTTP__PORT="0",
        SCHEDULER_HTTP__ADMIN_TOKEN_FILE=str(token),
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.2",
        SCHEDULER_GENERATION__SINK=sink,
        SCHEDULER_GENERATION__ARQ__REDIS_URL=namespace.redis_url,
        SCHEDULER_GENERATION__ARQ__QUEUE_NAME=namespace.queue_name,
        SCHEDULER_GENERATION__ARQ__JOB_ID_PREFIX=namespace.job_id_prefix,
        PYTHONPATH=str(ROOT),
    )
    return env


def log_events(log: Path, offset: int = 0) -> list[dict[str, Any]]:
    events = []
    with log.open("rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def start_daemon(env: dict[str, str], log: Path, *args: str) -> Daemon:
    """``scheduler-daemon [args] run``; returns once its admin port is bound."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", *args, "run"], env=env, stdout=out, stderr=out, cwd=ROOT
        )

    def bound_port() -> int | None:
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}: {log.read_text()[-3000:]}")
        return next((int(e["port"]) for e in log_events(log, offset) if e.get("event") == "http_listening"), None)

    try:
        port = poll(bound_port, timeout=60, what="the daemon's admin port")
    except BaseException:
        stop_process(proc, signal.SIGKILL)
        raise
    return Daemon(proc, f"http://127.0.0.1:{port}")


def runs(path: Path) -> list[str]:
    """What the worker ran: ``request_id job_id try`` per job."""
    return path.read_text().splitlines() if path.exists() else []


def test_a_request_becomes_one_arq_job_that_reports_back(
    db_url: str, tmp_path: Path, namespace: ArqNamespace, rows: Any
) -> None:
    """Configured in the TOML file: the request is enqueued, run once by the worker and completed over HTTP."""
    _world, request_id = seed(db_url)
    token = tmp_path / "admin-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[database]
url = "{db_url}"

[http]
bind = "127.0.0.1"
port = 0
admin_token_file = "{token}"

[scheduler]
discovery_interval_seconds = 0.2

[logging]
format = "json"

[generation]
sink = "{ARQ_SINK}"

[generation.arq]
redis_url = "{namespace.redis_url}"
queue_name = "{namespace.queue_name}"
job_id_prefix = "{namespace.job_id_prefix}"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["PYTHONPATH"] = str(ROOT)
    log, worker_log, run_file = tmp_path / "daemon.log", tmp_path / "worker.log", tmp_path / "runs"
    daemon = start_daemon(env, log, "--config", str(config))
    worker = None
    try:
        poll(lambda: rows(request_id)[:2] == ("enqueued", True), timeout=30, what="the hand-off to ARQ")
        # Handed off means on the queue, under the request's own job id.
        assert namespace.queued() == 1
        assert namespace.job_keys() == [f"arq:job:{namespace.job_id(request_id)}"]
        worker = start_worker(namespace, daemon_url=daemon.url, token=TOKEN, runs=run_file, log=worker_log)
        poll(lambda: rows(request_id)[0] == "succeeded", timeout=60, what="the worker to complete the request")
        poll(lambda: namespace.finished(request_id), timeout=30, what="ARQ to finish the job")
    finally:
        if worker is not None:
            stop_process(worker)
        assert stop_process(daemon.proc) == 0, log.read_text()[-3000:]
    assert runs(run_file) == [f"{request_id} {namespace.job_id(request_id)} 1"], worker_log.read_text()[-3000:]
    assert rows(request_id)[1:3] == (True, 0)
    # Nothing left to run: the job is done and only its result is kept (the worker's keep_result).
    assert namespace.queued() == 0
    assert namespace.job_keys() == [f"arq:result:{namespace.job_id(request_id)}"]
    assert not [e for e in log_events(log) if e.get("level") in ("error", "critical")]


def test_a_redis_outage_keeps_requests_in_the_outbox_until_redis_is_back(
    db_url: str, tmp_path: Path, rows: Any
) -> None:
    """Redis down before the first connection, and again under an open pool: retried, then handed out once each."""
    server = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    namespace = ArqNamespace(server.url)
    world, first = seed(db_url)
    log, worker_log, run_file = tmp_path / "daemon.log", tmp_path / "worker.log", tmp_path / "runs"
    daemon = start_daemon(daemon_env(db_url, tmp_path, namespace), log)
    worker = None
    try:
        # Each failed hand-off sends the request back to pending with attempts + 1 and the error kept.
        status, handed_off, _attempts, error = poll(
            lambda: (r := rows(first))[2] >= 2 and r, timeout=30, what="two failed hand-offs"
        )
        assert (status, handed_off) in (("pending", False), ("enqueued", False))
        assert error is not None and "ConnectionError" in error and str(server.port) in error
        server.start()
        poll(lambda: rows(first)[:2] == ("enqueued", True), timeout=30, what="the hand-off once Redis is back")
        worker = start_worker(namespace, daemon_url=daemon.url, token=TOKEN, runs=run_file, log=worker_log)
        poll(lambda: rows(first)[0] == "succeeded", timeout=60, what="the first request to complete")
        poll(lambda: namespace.finished(first), timeout=30, what="ARQ to finish the first job")

        # Redis goes away under the daemon's open connections, and comes back empty.
        stop_process(worker)
        worker = None
        server.stop()
        second = asyncio.run(_create_request(db_url, world))
        poll(lambda: rows(second)[2] >= 1, timeout=30, what="a failed hand-off of the second request")
        assert not rows(second)[1]
        server.start()
        poll(lambda: rows(second)[:2] == ("enqueued", True), timeout=30, what="the second hand-off")
        assert namespace.queued() == 1
        worker = start_worker(namespace, daemon_url=daemon.url, token=TOKEN, runs=run_file, log=worker_log)
        poll(lambda: rows(second)[0] == "succeeded", timeout=60, what="the second request to complete")
        poll(lambda: namespace.finished(second), timeout=30, what="ARQ to finish the second job")
        assert namespace.queued() == 0
    finally:
        if worker is not None:
            stop_process(worker)
        code = stop_process(daemon.proc)
        namespace.cleanup()
        server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert runs(run_file) == [
        f"{first} {namespace.job_id(first)} 1",
        f"{second} {namespace.job_id(second)} 1",
    ], worker_log.read_text()[-3000:]
    failures = [e for e in log_events(log) if e.get("event") == "generation_handoff_failed"]
    assert failures and {e["request_id"] for e in failures} == {first, second}


def killed_inside_hand_off(
    db_url: str, tmp_path: Path, namespace: ArqNamespace, sink: str
) -> tuple[int, dict[str, str], Daemon]:
    """A request claimed by a daemon (log ``daemon.log``) killed with -9 while ``sink`` blocks in its hand-off.

    Returns the request, the environment to restart the daemon with (the default ARQ sink), and the killed daemon.
    """
    _world, request_id = seed(db_url)
    marker = tmp_path / "marker"
    env = daemon_env(db_url, tmp_path, namespace)
    # The blocked sink must still be running when the test kills the daemon.
    env.update(
        SCHEDULER_SCHEDULER__TICK_TIMEOUT_SECONDS="120",
        SCHEDULER_GENERATION__SINK_TIMEOUT_SECONDS="60",
        # PostgreSQL: the restarted daemon takes the killed one's lease over once it expires.
        SCHEDULER_SCHEDULER__LEASE_TTL_SECONDS="2",
        SINK_MARKER_FILE=str(marker),
    )
    first = start_daemon({**env, "SCHEDULER_GENERATION__SINK": sink}, tmp_path / "daemon.log")
    try:
        poll(lambda: marker.exists() and marker.read_text().strip(), timeout=30, what="the sink to be entered")
    finally:
        stop_process(first.proc, signal.SIGKILL)
    return request_id, env, first


@pytest.mark.parametrize(
    ("blocking_sink", "enqueued_before_kill"),
    [("tests.support.sinks:blocking_sink", False), ("tests.support.sinks:arq_enqueue_then_block", True)],
    ids=["killed-before-enqueue", "killed-after-enqueue"],
)
def test_sigkill_between_claim_and_hand_off_loses_nothing_and_runs_nothing_twice(
    db_url: str,
    tmp_path: Path,
    namespace: ArqNamespace,
    rows: Any,
    blocking_sink: str,
    enqueued_before_kill: bool,
) -> None:
    """kill -9 inside the hand-off (the claim committed, not marked handed off); the restart hands it out once."""
    request_id, env, _first = killed_inside_hand_off(db_url, tmp_path, namespace, blocking_sink)
    log, worker_log, run_file = tmp_path / "daemon.log", tmp_path / "worker.log", tmp_path / "runs"
    assert rows(request_id)[:3] == ("enqueued", False, 0)  # a committed claim, still in the outbox
    assert namespace.queued() == (1 if enqueued_before_kill else 0)

    offset = log.stat().st_size
    second = start_daemon(env, log)
    worker = None
    try:
        poll(lambda: rows(request_id)[:2] == ("enqueued", True), timeout=30, what="the hand-off after the restart")
        assert namespace.queued() == 1  # one job, whether or not the first daemon had enqueued it
        worker = start_worker(namespace, daemon_url=second.url, token=TOKEN, runs=run_file, log=worker_log)
        poll(lambda: rows(request_id)[0] == "succeeded", timeout=60, what="the worker to complete the request")
        poll(lambda: namespace.finished(request_id), timeout=30, what="ARQ to finish the job")
    finally:
        if worker is not None:
            stop_process(worker)
        assert stop_process(second.proc) == 0, log.read_text()[-3000:]
    assert runs(run_file) == [f"{request_id} {namespace.job_id(request_id)} 1"], worker_log.read_text()[-3000:]
    assert namespace.queued() == 0
    duplicates = [e for e in log_events(log, offset) if e.get("event") == "generation_request_already_queued"]
    assert [e["request_id"] for e in duplicates] == ([request_id] if enqueued_before_kill else [])


def test_a_job_whose_report_found_the_daemon_down_runs_again_after_the_restart(
    db_url: str, tmp_path: Path, namespace: ArqNamespace, rows: Any
) -> None:
    """kill -9 after the enqueue; the worker runs the job meanwhile and cannot report: the request is not lost."""
    sink = "tests.support.sinks:arq_enqueue_then_block"
    request_id, env, first = killed_inside_hand_off(db_url, tmp_path, namespace, sink)
    log, worker_log, run_file = tmp_path / "daemon.log", tmp_path / "worker.log", tmp_path / "runs"
    worker = start_worker(namespace, daemon_url=first.url, token=TOKEN, runs=run_file, log=worker_log)
    try:
        # The job runs while the daemon is down: its report is refused by the dead port, so the job fails.
        poll(lambda: namespace.finished(request_id), timeout=30, what="the job to fail")
    finally:
        stop_process(worker)  # it reports to the dead daemon's port; the next one gets the new daemon's
    assert len(runs(run_file)) == 1
    assert rows(request_id)[:2] == ("enqueued", False)  # its outcome never reached the database

    offset = log.stat().st_size
    second = start_daemon(env, log)
    worker = None
    try:
        worker = start_worker(namespace, daemon_url=second.url, token=TOKEN, runs=run_file, log=worker_log)
        poll(lambda: rows(request_id)[0] == "succeeded", timeout=60, what="the request to run again and complete")
        poll(lambda: namespace.finished(request_id), timeout=30, what="ARQ to finish the second job")
    finally:
        if worker is not None:
            stop_process(worker)
        assert stop_process(second.proc) == 0, log.read_text()[-3000:]
    assert runs(run_file) == [f"{request_id} {namespace.job_id(request_id)} 1"] * 2, worker_log.read_text()[-3000:]
    assert namespace.queued() == 0
    again = [e for e in log_events(log, offset) if e.get("event") == "generation_request_requeued"]
    assert [e["request_id"] for e in again] == [request_id]
