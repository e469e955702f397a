"""The daemon's system calls against the shipped units' ``SystemCallFilter=``.

Without systemd as PID 1 the filter cannot be applied here. Instead the daemon
lives a whole service life under ``strace -f`` — ``db upgrade`` (the units'
ExecStartPre), start, READY=1 and WATCHDOG=1 over a notify socket, /healthz and
/metrics over TCP, a SIGHUP reload, a SIGTERM stop — once on SQLite and once
as ``run --workers 2`` on PostgreSQL over its unix socket. Every call any of
its processes made must be in the allow-list (@system-service) and in neither
group the units take back (@privileged, @resources), as ``systemd-analyze
syscall-filter`` of this machine expands them. This covers the paths these
scenarios take, not every branch of the code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL, make_url

from tests.process.test_daemon_lifecycle import NotifySocket, poll_sync
from tests.support.seeding import process_env
from tests.system.test_systemd_units import ALL_UNITS, UNIT_DIR, parse_unit, values

pytestmark = pytest.mark.subprocess

STRACE = shutil.which("strace")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ROOT = UNIT_DIR.parent
TOKEN = "syscall-test-token"


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a ``@group`` (nested groups included), from ``systemd-analyze syscall-filter``."""
    assert SYSTEMD_ANALYZE is not None
    seen = set() if seen is None else seen
    seen.add(group)
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager", group], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines():
        if not line.startswith("    ") or line.strip().startswith("#"):
            continue  # the group's own name, its description, blank lines
        name = line.strip()
        if name.startswith("@"):
            calls |= expand(name, seen) if name not in seen else set()
        else:
            calls.add(name)
    assert calls, f"systemd-analyze knows no group {group}"
    return calls


def unit_filter() -> tuple[set[str], set[str]]:
    """(allowed, denied) system calls, from the units' ``SystemCallFilter=`` lines (identical in all)."""
    filters = {
        tuple(values(parse_unit((UNIT_DIR / u).read_text(encoding="utf-8")), "Service", "SystemCallFilter"))
        for u in ALL_UNITS
    }
    assert len(filters) == 1, filters
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in filters.pop():
        target = denied if line.startswith("~") else allowed
        for group in line.lstrip("~").split():
            target |= expand(group) if group.startswith("@") else {group}
    return allowed, denied


def traced_calls(summary: Path) -> set[str]:
    """System call names from ``strace -c`` tables (one per process tree)."""
    calls: set[str] = set()
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].replace(".", "", 1).isdigit() and fields[-1] != "total":
            calls.add(fields[-1])
    return calls


def as_service_user() -> list[str]:
    """A prefix that runs a command as a non-root user, as the units' DynamicUser= does.

    Root takes other paths (SQLite hands a new file to its directory's owner
    with fchown, in @privileged). A user namespace where this process is
    "nobody" (as PrivateUsers= makes one) changes the uid the daemon sees
    while the files it needs stay readable.
    """
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot enter a user namespace as nobody (unshare --user)")
    return prefix


def strace(summary: Path, *argv: str) -> list[str]:
    assert STRACE is not None
    # -f: the supervisor's workers too; -c: only a count per call, so tracing stays cheap.
    return [*as_service_user(), STRACE, "-f", "-c", "-o", str(summary), sys.executable, "-m", "scheduler_daemon", *argv]


def listening_port(log: Path) -> int | None:
    """The port from the first ``http_listening`` line of a JSON log."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "http_listening" and "port" in entry:
                return int(entry["port"])
    return None


def daemon_pid(traced: subprocess.Popen[bytes]) -> int:
    """The daemon's pid: strace's first child (a signal sent to strace itself would detach it).

    ``unshare`` without ``--fork`` execs strace, so strace keeps the pid Popen knows.
    """
    children = Path(f"/proc/{traced.pid}/task/{traced.pid}/children").read_text().split()
    assert children, "strace has not started the daemon"
    return int(children[0])


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    with tempfile.TemporaryDirectory(prefix="sdc-") as d:  # sun_path: 108 bytes at most
        sock = NotifySocket(Path(d))
        try:
            yield sock
        finally:
            sock.close()


def unix_socket_url(url: str) -> str:
    """The same PostgreSQL database, reached over the server's unix socket instead of TCP."""
    parsed = make_url(url)
    directory = Path("/var/run/postgresql")
    if not (directory / f".s.PGSQL.{parsed.port or 5432}").exists():
        pytest.skip(f"no PostgreSQL unix socket in {directory} for port {parsed.port or 5432}")
    over_socket = URL.create(
        parsed.drivername, parsed.username, parsed.password, database=parsed.database, query={"host": str(directory)}
    )
    return over_socket.render_as_string(hide_password=False)


def database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}"
    return unix_socket_url(request.getfixturevalue("pg_scratch_url"))


@pytest.mark.skipif(STRACE is None, reason="strace not on PATH (Debian: apt-get install -y strace)")
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not on PATH (Debian: apt-get install -y systemd)")
@pytest.mark.parametrize(
    ("backend", "workers"), [("sqlite", 1), pytest.param("postgres", 2, marks=pytest.mark.postgres)]
)
def test_a_service_life_needs_no_call_the_units_refuse(
    backend: str, workers: int, notify: NotifySocket, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    allowed, denied = unit_filter()
    url = database(request, backend, tmp_path)
    token = tmp_path / "admin-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[http]\nport = 0\nadmin_token_file = "{token}"\n[logging]\nformat = "json"\n')
    env = process_env(url)

    migrate = subprocess.run(
        strace(tmp_path / "migrate.strace", "--config", str(cfg), "db", "upgrade"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert migrate.returncode == 0, migrate.stderr

    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        traced = subprocess.Popen(
            strace(tmp_path / "run.strace", "--config", str(cfg), "run", "--workers", str(workers)),
            # The units' WatchdogSec=30s; shorter here so WATCHDOG=1 is sent while traced.
            env={**env, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "4000000"},
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    try:
        port = poll_sync(lambda: listening_port(log), timeout=60, what="the daemon's port")
        notify.wait_for("READY", after=0, timeout=60)
        notify.wait_for("WATCHDOG", after=0, timeout=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/metrics").status_code == 200
            mark = notify.mark()
            os.kill(daemon_pid(traced), signal.SIGHUP)
            notify.wait_for("RELOADING", after=mark)
            notify.wait_for("READY", after=mark)
        os.kill(daemon_pid(traced), signal.SIGTERM)
        assert traced.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if traced.poll() is None:
            traced.kill()
            traced.wait(timeout=30)

    calls = traced_calls(tmp_path / "migrate.strace") | traced_calls(tmp_path / "run.strace")
    # The trace saw the whole life: processes started, a socket served, the notify socket written.
    assert {"execve", "accept4", "sendto"} <= calls, sorted(calls)
    if workers > 1:
        assert calls & {"clone", "clone3", "vfork"}, sorted(calls)
    assert sorted(calls & denied) == []
    assert sorted(calls - allowed) == []
