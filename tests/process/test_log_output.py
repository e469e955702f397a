"""What the daemon and an embedding application see on stderr, in real processes.

- journald: with ``JOURNAL_STREAM`` naming the child's stderr (its
  ``device:inode``, as systemd sets it), every line starts with its syslog
  priority ``<N>``; without it, or naming another file, no prefix.
- levels: the package's own stdlib loggers follow ``[logging] level``,
  third-party libraries stay at WARNING.
- ``--workers``: the workers' lines carry ``worker`` and the journal's
  prefix; a SIGHUP changing ``[logging]`` reaches the supervisor's lines too.
- embedding: a host that runs ticks without configuring logging sees
  nothing on stdout or stderr (no DEBUG tick lines); its own logging config
  decides when it has one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.process.test_daemon_world_time import ROOT, poll
from tests.support.cluster import Cluster
from tests.support.helpers import make_world

pytestmark = pytest.mark.subprocess

PREFIXED = re.compile(r"^<(\d)>(.*)$")

# Logs one line per level through the package's structlog and stdlib loggers, and two third-party lines.
LEVELS_SCRIPT = """
import logging, sys
from scheduler_daemon.logs import configure_logging, get_logger

configure_logging(sys.argv[1], "json")
log = get_logger("scheduler_daemon.probe")
log.debug("probe_debug")
log.info("probe_info", n=1)
log.warning("probe_warning")
log.error("probe_error")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("probe_exception")
log.critical("probe_critical")
logging.getLogger("scheduler_daemon.systemd").info("sd_notify_recovered", extra={"notify_socket": "/run/n"})
logging.getLogger("scheduler_daemon.systemd").debug("stdlib_debug")
logging.getLogger("sqlalchemy.pool").info("third_party_info")
logging.getLogger("sqlalchemy.pool").warning("third_party_warning")
"""

# A host application: runs a world's ticks with SchedulerLoopRunner, logging configured only if asked.
EMBEDDING_SCRIPT = """
import asyncio, logging, sys
from scheduler_daemon import SchedulerLoopRunner, Store, WorldScheduler

if sys.argv[3] == "host-debug":
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")
    for noisy in ("sqlalchemy", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def main() -> None:
    store = Store.from_url(sys.argv[1])
    scheduler = WorldScheduler(store)
    runner = SchedulerLoopRunner(scheduler)
    await scheduler.register_world(int(sys.argv[2]))
    task = asyncio.create_task(runner.start())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while runner.ticks_ok < 3:
        if loop.time() > deadline or task.done():
            raise SystemExit("no ticks within 30 s")
        await asyncio.sleep(0.02)
    runner.stop()
    await task
    await runner.shutdown()
    await store.dispose()
    print("ticks_ok", runner.ticks_ok)


asyncio.run(main())
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("JOURNAL_STREAM", None)
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def journal_of(path: Path) -> str:
    """``device:inode`` of ``path``: what systemd puts in ``JOURNAL_STREAM`` for the stream it opened."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def run_levels(tmp_path: Path, level: str, journal: str | None) -> list[str]:
    stderr = tmp_path / f"stderr-{level}-{journal is not None}.log"
    stderr.touch()
    env = child_env(**({"JOURNAL_STREAM": journal_of(stderr) if journal == "self" else journal} if journal else {}))
    with stderr.open("w") as err:
        done = subprocess.run(
            [sys.executable, "-c", LEVELS_SCRIPT, level], env=env, stderr=err, stdout=subprocess.PIPE, timeout=60
        )
    assert done.returncode == 0, stderr.read_text()
    assert done.stdout == b""
    return stderr.read_text().splitlines()


def events(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON lines (the traceback is inside a line's ``exception`` field)."""
    return [json.loads(line) for line in lines]


def test_journal_stream_gets_a_syslog_priority_on_every_line(tmp_path: Path) -> None:
    lines = run_levels(tmp_path, "DEBUG", journal="self")
    parsed = [PREFIXED.match(line) for line in lines]
    assert all(parsed), lines
    by_event = {json.loads(m[2])["event"]: int(m[1]) for m in parsed if m}
    assert by_event == {
        "probe_debug": 7,
        "probe_info": 6,
        "probe_warning": 4,
        "probe_error": 3,
        "probe_exception": 3,
        "probe_critical": 2,
        "sd_notify_recovered": 6,
        "stdlib_debug": 7,
        "third_party_warning": 4,
    }


def test_no_prefix_off_the_journal_or_when_journal_stream_names_another_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.touch()
    for journal in (None, journal_of(other)):
        lines = run_levels(tmp_path, "INFO", journal=journal)
        assert lines and not [line for line in lines if not line.startswith("{")], lines


def test_logger_names_and_levels_of_the_package_and_third_parties(tmp_path: Path) -> None:
    lines = events(run_levels(tmp_path, "INFO", journal=None))
    assert [(e["event"], e["logger"], e["level"]) for e in lines] == [
        ("probe_info", "scheduler_daemon.probe", "info"),
        ("probe_warning", "scheduler_daemon.probe", "warning"),
        ("probe_error", "scheduler_daemon.probe", "error"),
        ("probe_exception", "scheduler_daemon.probe", "error"),
        ("probe_critical", "scheduler_daemon.probe", "critical"),
        # The package's stdlib logger at the configured level, its fields from extra=.
        ("sd_notify_recovered", "scheduler_daemon.systemd", "info"),
        # Third-party: WARNING and up only.
        ("third_party_warning", "sqlalchemy.pool", "warning"),
    ]
    assert lines[0]["n"] == 1 and lines[5]["notify_socket"] == "/run/n"
    assert lines[3]["exception"][0]["exc_value"] == "boom"
    assert all("timestamp" in e for e in lines)


def test_the_daemon_under_the_journal_prefixes_all_its_lines(tmp_path: Path) -> None:
    stderr = tmp_path / "daemon.log"
    stderr.touch()
    env = child_env(
        JOURNAL_STREAM=journal_of(stderr),
        SCHEDULER_DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}",
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__ENABLED="false",
    )
    upgrade = subprocess.run([sys.executable, "-m", "scheduler_daemon", "db", "upgrade"], env=env, timeout=60)
    assert upgrade.returncode == 0
    with stderr.open("a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler_daemon", "run"], env=env, stderr=err, stdout=err)
        try:
            poll(lambda: '"event": "ready"' in stderr.read_text(), timeout=30, what="the daemon's ready line")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0
    lines = stderr.read_text().splitlines()
    parsed = [PREFIXED.match(line) for line in lines]
    assert lines and all(parsed), lines
    priorities = {json.loads(m[2])["event"]: int(m[1]) for m in parsed if m}
    assert priorities["ready"] == 6 and priorities["stopped"] == 6
    assert all(json.loads(m[2])["logger"].startswith("scheduler_daemon.") for m in parsed if m)


@pytest.fixture
def ticking_world(tmp_path: Path) -> tuple[str, int]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'host.db'}"

    async def seed() -> int:
        store = Store.from_url(url)
        try:
            await store.upgrade()
            world_id, _ = await make_world(
                store, simulation={"tickIntervalSeconds": 0.05}, npcs_per_tier={Tier.DETAILED: 3}
            )
            return world_id
        finally:
            await store.dispose()

    return url, asyncio.run(seed())


def test_embedding_configures_no_logging_and_prints_nothing(ticking_world: tuple[str, int]) -> None:
    url, world_id = ticking_world
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDING_SCRIPT, url, str(world_id), "no-config"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ticks_ok ") and done.stdout.count("\n") == 1, done.stdout
    assert done.stderr == ""


def test_embedding_host_logging_config_decides(ticking_world: tuple[str, int]) -> None:
    url, world_id = ticking_world
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDING_SCRIPT, url, str(world_id), "host-debug"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ticks = [line for line in done.stderr.splitlines() if line.startswith("DEBUG scheduler_daemon.scheduler tick ")]
    assert len(ticks) >= 3, done.stderr
    assert f"world_id={world_id}" in ticks[0]
    assert "INFO scheduler_daemon.runner scheduler_loop_stopped ticks_ok=" in done.stderr


WORKERS_CONFIG = """
[http]
port = 0
[scheduler]
lease_ttl_seconds = 3
discovery_interval_seconds = 0.5
[logging]
format = "{fmt}"
level = "INFO"
"""


@pytest.mark.postgres
def test_workers_under_the_journal_and_a_format_reload_of_the_supervisor_and_workers(
    tmp_path: Path, pg_database_url: str
) -> None:
    """``run --workers 2``: the workers' lines carry ``worker`` and the inherited journal's prefix; a SIGHUP
    switching ``[logging] format`` reaches the supervisor's own lines as well as the workers'."""
    cluster = Cluster(pg_database_url, tmp_path, ttl=3.0, discovery=0.5)
    try:
        cluster.reset(2, tick_interval=0.5)
        cfg = tmp_path / "config.toml"
        cfg.write_text(WORKERS_CONFIG.format(fmt="json"))
        stderr = tmp_path / "box.log"
        stderr.touch()
        env = child_env(
            JOURNAL_STREAM=journal_of(stderr), SCHEDULER_DATABASE__URL=cluster.url, SCHEDULER_SCHEDULER__INSTANCE_ID="b"
        )
        with stderr.open("a") as err:
            box = subprocess.Popen(
                [sys.executable, "-m", "scheduler_daemon", "--config", str(cfg), "run", "--workers", "2"],
                env=env,
                stderr=err,
                stdout=err,
                cwd=ROOT,
            )
        try:

            def json_lines() -> list[dict[str, Any]]:
                found = (PREFIXED.match(line) for line in stderr.read_text().splitlines())
                return [json.loads(m[2]) for m in found if m and m[2].startswith("{")]

            poll(
                lambda: len([e for e in json_lines() if e["event"] == "ready"]) >= 3,
                timeout=60,
                what="both workers and the supervisor ready",
            )
            before = stderr.read_text().splitlines()
            assert before and all(PREFIXED.match(line) for line in before), before
            # Every line of a worker names it as the supervisor's lines about it do ("0", its metrics label);
            # the supervisor's own lines (its port's included) have no worker of their own.
            lines = json_lines()
            assert {e["worker"] for e in lines if e["event"] == "worker_started"} == {"0", "1"}
            supervisor = {e["event"] for e in lines if "worker" not in e}
            assert supervisor <= {"workers_starting", "http_listening", "admin_api_unauthenticated", "ready"}, lines
            assert {e.get("worker") for e in lines if e["event"] == "ready"} == {"0", "1", None}, lines

            cfg.write_text(WORKERS_CONFIG.format(fmt="console"))
            box.send_signal(signal.SIGHUP)

            def forwarded_line() -> str | None:
                return next(
                    (line for line in stderr.read_text().splitlines() if "config_reload_forwarded" in line), None
                )

            forwarded = poll(
                forwarded_line,
                timeout=60,
                what="the supervisor to forward the reload",
            )
            # Console format, and still prefixed: the supervisor reconfigured its own logging too.
            assert PREFIXED.match(forwarded) and not forwarded.startswith("<6>{"), forwarded
            assert "[scheduler_daemon.supervisor]" in forwarded, forwarded
        finally:
            box.send_signal(signal.SIGTERM)
            box.wait(timeout=60)
        assert box.returncode == 0
        after = stderr.read_text().splitlines()[len(before) :]
        assert after and all(PREFIXED.match(line) for line in after), after
        stopped = [line for line in after if "worker_stopped" in line]
        assert stopped and not any(line.startswith("<6>{") for line in stopped), stopped
    finally:
        cluster.close()
