"""The real daemon under a stand-in for systemd: a datagram socket as NOTIFY_SOCKET.

Each test starts ``python -m scheduler_daemon run`` with its own database and
config file, reads every sd_notify datagram and the JSON log, sends real
signals and checks the database. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import text

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.support.helpers import make_world, world_state
from tests.support.plugins import BLOCK_MARKER_ENV

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

INTERVAL = 0.25  # the test world's tickIntervalSeconds
SCALE = 60.0
RELOAD_FAILED = "config_reload_failed"


def config_text(level: str, scheduler: str = "discovery_interval_seconds = 0.5\n") -> str:
    return f'[scheduler]\n{scheduler}[logging]\nlevel = "{level}"\nformat = "json"\n'


# ------------------------------------------------------------------ helpers
class NotifySocket:
    """systemd's side of sd_notify: a bound AF_UNIX datagram socket, read by a thread."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            with self._lock:
                self.messages.append(fields)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def mark(self) -> int:
        """Send a marker through the socket and wait for it: everything sent before is collected.

        Returns the index just past the marker, for ``after=``.
        """
        token = f"{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"TEST_MARK={token}".encode(), self.path)
        return poll_sync(
            lambda: next((i + 1 for i, m in enumerate(self.snapshot()) if m.get("TEST_MARK") == token), None),
            timeout=10,
            what="the notify socket reader",
        )

    def wait_for(self, key: str, *, after: int, timeout: float = 30) -> tuple[int, dict[str, str]]:
        """The first message from index ``after`` on that carries ``key``."""

        def find() -> tuple[int, dict[str, str]] | None:
            for i, m in enumerate(self.snapshot()[after:], start=after):
                if key in m:
                    return i, m
            return None

        found = poll_sync(find, timeout=timeout, what=f"sd_notify {key}")
        assert found is not None
        return found

    def count(self, key: str, *, after: int = 0) -> int:
        return sum(key in m for m in self.snapshot()[after:])

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()


def poll_sync(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


async def poll(predicate: Callable[[], Awaitable[T | None]], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class DaemonProcess:
    """``scheduler-daemon run`` as a child process; its log goes to a file we parse."""

    def __init__(self, tmp: Path, env: dict[str, str], config: Path) -> None:
        self.log_path = tmp / "daemon.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=ROOT,
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                out.append({"event": raw, "level": "raw"})
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    # sun_path is limited to 108 bytes; pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        sock = NotifySocket(Path(d))
        try:
            yield sock
        finally:
            sock.close()


def daemon_env(db_url: str, notify: NotifySocket, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCHEDULER_", "WATCHDOG_", "NOTIFY_SOCKET", BLOCK_MARKER_ENV))
    }
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_HTTP__ENABLED="false",
        NOTIFY_SOCKET=notify.path,
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


@pytest.fixture
async def world(store: Store) -> AsyncIterator[int]:
    world_id, _ = await make_world(
        store,
        simulation={"tickIntervalSeconds": INTERVAL, "timeScale": SCALE},
        npcs_per_tier={Tier.ACTIVE: 3},
    )
    yield world_id


def tick_lines(daemon: DaemonProcess, world_id: int) -> list[dict[str, Any]]:
    return [line for line in daemon.events("tick") if line.get("world_id") == world_id]


# --------------------------------------------------------------------- tests
async def test_ready_reload_failures_and_clean_stop(
    store: Store, world: int, db_url: str, notify: NotifySocket, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text("INFO"))
    daemon = DaemonProcess(tmp_path, daemon_env(db_url, notify), config)
    try:
        # READY=1 once migrated, connected and serving (the world is registered).
        _, ready = notify.wait_for("READY", after=0)
        assert ready["READY"] == "1"
        assert notify.count("RELOADING") == 0 and notify.count("STOPPING") == 0
        assert [e["world_id"] for e in daemon.events("world_registered")] == [world]
        await poll(lambda: _ticks_at_least(store, world, 2), timeout=30, what="two ticks")
        assert tick_lines(daemon, world) == []  # INFO: no per-tick lines

        # Raise the log level in the file, SIGHUP: RELOADING=1 + MONOTONIC_USEC, READY=1, DEBUG in effect.
        config.write_text(config_text("DEBUG"))
        before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        mark = notify.mark()
        daemon.signal(signal.SIGHUP)
        at, reloading = notify.wait_for("RELOADING", after=mark)
        after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before_usec <= int(reloading["MONOTONIC_USEC"]) <= after_usec  # same datagram, CLOCK_MONOTONIC
        _, done = notify.wait_for("READY", after=at + 1)
        assert "reload failed" not in done.get("STATUS", "")
        poll_sync(lambda: len(tick_lines(daemon, world)) >= 3, timeout=30, what="DEBUG tick lines")
        first_debug = tick_lines(daemon, world)[0]

        # Broken files: each SIGHUP fails, is reported, and the old settings keep running.
        failures = [
            ("[logging\nlevel = 'DEBUG'\n", f"{config}: invalid TOML: "),
            (
                config_text("ERROR", "max_concurrent_ticks = 0\n"),
                f"{config}: scheduler.max_concurrent_ticks: Input should be greater than or equal to 1",
            ),
            (None, f"{config}: config file not found"),
        ]
        for n, (content, reason) in enumerate(failures, start=1):
            if content is None:
                config.unlink()
            else:
                config.write_text(content)
            mark = notify.mark()
            daemon.signal(signal.SIGHUP)
            at, _ = notify.wait_for("RELOADING", after=mark)
            _, done = notify.wait_for("READY", after=at + 1)
            assert done["STATUS"].startswith("reload failed, running the previous configuration: ")
            errors = poll_sync(
                lambda n=n: len(e := daemon.events(RELOAD_FAILED)) >= n and e,
                timeout=10,
                what="the reload failure in the log",
            )
            assert errors[-1]["level"] == "error"
            assert errors[-1]["error"].startswith(reason), errors[-1]["error"]
            # Still ticking, still at DEBUG (the ERROR level of the rejected file is not applied).
            seen = len(tick_lines(daemon, world))
            poll_sync(lambda seen=seen: len(tick_lines(daemon, world)) >= seen + 2, timeout=30, what="ticks go on")

        # A valid file again: success; a restart-only change is reported, not applied.
        config.write_text(config_text("DEBUG", "discovery_interval_seconds = 0.4\n") + "[database]\npool_size = 3\n")
        mark = notify.mark()
        daemon.signal(signal.SIGHUP)
        at, _ = notify.wait_for("RELOADING", after=mark)
        _, done = notify.wait_for("READY", after=at + 1)
        assert done["STATUS"].endswith("restart needed for database.pool_size")
        reloaded = daemon.events("config_reloaded")
        assert reloaded[-1]["restart_needed"] == ["database.pool_size"]
        assert daemon.events("settings_need_restart")
        seen = len(tick_lines(daemon, world))
        poll_sync(lambda: len(tick_lines(daemon, world)) >= seen + 3, timeout=30, what="ticks after the reload")

        # SIGTERM: STOPPING=1 (once), exit 0, every committed tick persisted.
        assert daemon.stop() == 0, daemon.tail()
        notify.mark()
        assert notify.count("STOPPING") == 1
        assert notify.count("READY") == 1 + 1 + len(failures) + 1  # start, then one per reload
        assert daemon.events("stopped")
    finally:
        daemon.kill()

    # World clocks were untouched by five reloads: every DEBUG tick continues the previous
    # one exactly (no jump), the world time covers the real time between the ticks (no
    # time lost), and no tick was delayed by a reload.
    ticks = tick_lines(daemon, world)
    assert ticks[0] == first_debug
    for prev, cur in itertools.pairwise(ticks):
        assert cur["world_time"] - cur["delta_game_seconds"] == pytest.approx(prev["world_time"], abs=1e-6)
        assert cur["delta_game_seconds"] == pytest.approx(cur["delta_real_seconds"] * SCALE, rel=1e-6)
        assert cur["delta_real_seconds"] < INTERVAL + 1.5, cur
    wall = _ts(ticks[-1]) - _ts(ticks[0])
    real = sum(t["delta_real_seconds"] for t in ticks[1:])
    assert real == pytest.approx(wall, abs=0.25)
    # Same fixed-rate grid throughout: every slot was ticked or counted as missed
    # (a tick overrunning its slot on a busy machine), none silently dropped.
    missed = sum(e["missed"] for e in daemon.events("tick_slots_missed") if e["world_id"] == world)
    assert len(ticks) - 1 + missed == pytest.approx(real / INTERVAL, abs=1)
    # The last logged tick is what the database holds.
    world_time, count = await world_state(store, world)
    assert world_time == pytest.approx(ticks[-1]["world_time"], abs=1e-6)
    assert count >= len(ticks)


async def test_watchdog_stops_while_the_loop_is_wedged_and_sighup_bursts_coalesce(
    store: Store, db_url: str, notify: NotifySocket, tmp_path: Path
) -> None:
    # NPCs due every 0.1 s (decision interval 60 game s at 600×): the plug-in runs on most ticks.
    world_id, _ = await make_world(
        store, simulation={"tickIntervalSeconds": 0.1, "timeScale": 600}, npcs_per_tier={Tier.DETAILED: 5}
    )
    config = tmp_path / "config.toml"
    config.write_text(config_text("INFO", 'behavior = "tests.support.plugins:blocking_decide"\n'))
    marker = tmp_path / "wedge"
    env = daemon_env(db_url, notify, WATCHDOG_USEC="1000000", **{BLOCK_MARKER_ENV: str(marker)})
    daemon = DaemonProcess(tmp_path, env, config)
    try:
        notify.wait_for("READY", after=0)
        notify.wait_for("WATCHDOG", after=0)  # fed every 0.5 s (half of WATCHDOG_USEC)

        marker.touch()
        poll_sync(lambda: Path(f"{marker}.blocked").exists(), timeout=30, what="the loop to wedge")
        mark = notify.mark()
        # Three watchdog intervals of silence: systemd would now kill and restart us.
        time.sleep(1.5)
        assert notify.count("WATCHDOG", after=mark) == 0
        marker.unlink()
        notify.wait_for("WATCHDOG", after=mark, timeout=10)  # fed again once the loop moves
        assert not Path(f"{marker}.blocked").exists()

        # Twenty SIGHUPs in a burst, a few ms apart like a shell loop of `kill -HUP`:
        # one reload, two or three if the machine stretches the burst past the first.
        mark = notify.mark()
        for _ in range(20):
            daemon.signal(signal.SIGHUP)
            time.sleep(0.005)
        at, _ = notify.wait_for("RELOADING", after=mark)
        notify.wait_for("READY", after=at + 1)
        time.sleep(1.0)  # room for any further reloads the burst would (wrongly) cause
        reloads = notify.count("RELOADING", after=mark)
        assert 1 <= reloads <= 3
        assert len(daemon.events("config_reloading")) == reloads
        assert daemon.proc.poll() is None
        ticks = (await world_state(store, world_id))[1]
        await poll(lambda: _ticks_at_least(store, world_id, ticks + 2), timeout=30, what="ticks after the burst")
        assert daemon.stop() == 0, daemon.tail()
    finally:
        marker.unlink(missing_ok=True)
        daemon.kill()


async def slow_ticks(store: Store, seconds: float) -> None:
    """Make every tick's world_states update sleep inside PostgreSQL (a real slow/stuck commit)."""
    async with store.transaction() as conn:
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION inject_fault_fn() RETURNS trigger AS $$ "
                f"BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await conn.execute(text("DROP TRIGGER IF EXISTS inject_fault ON world_states"))
        await conn.execute(
            text(
                # Only the tick's clock update: on PostgreSQL the lease statements
                # (claim, renewal) also update world_states and must not hang.
                "CREATE TRIGGER inject_fault BEFORE UPDATE ON world_states FOR EACH ROW "
                "WHEN (NEW.ticks IS DISTINCT FROM OLD.ticks) EXECUTE FUNCTION inject_fault_fn()"
            )
        )


def ticks_in_flight(admin: psycopg.Connection[Any], action: str = "") -> int:
    """How many of the daemon's connections are inside a tick's commit (``action`` applied to each)."""
    row = admin.execute(
        f"SELECT count({action}(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'scheduler-daemon' "
        "AND state = 'active' AND query ILIKE '%world_states%'"
    ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.postgres
async def test_daemon_keeps_ticking_when_its_database_connections_are_killed(
    pg_store: Store, pg_database_url: str, notify: NotifySocket, tmp_path: Path
) -> None:
    store = pg_store
    world_id, _ = await make_world(
        store, simulation={"tickIntervalSeconds": 0.2, "timeScale": 60}, npcs_per_tier={Tier.ACTIVE: 3}
    )
    # Slow every tick's commit down inside the server so a kill lands mid-transaction.
    await slow_ticks(store, 0.15)
    config = tmp_path / "config.toml"
    config.write_text(config_text("INFO", "discovery_interval_seconds = 0.5\ntick_timeout_seconds = 2\n"))
    daemon = DaemonProcess(tmp_path, daemon_env(pg_database_url, notify), config)
    libpq = pg_database_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        notify.wait_for("READY", after=0)
        await poll(lambda: _ticks_at_least(store, world_id, 2), timeout=30, what="two ticks")
        killed_mid_tick = 0
        with psycopg.connect(libpq, autocommit=True) as admin:
            for _ in range(3):
                killed_mid_tick += poll_sync(
                    lambda: ticks_in_flight(admin, "pg_terminate_backend"),
                    timeout=30,
                    what="a tick in flight",
                    interval=0.01,
                )
                # And every idle pooled connection: the pool must notice and replace them.
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'scheduler-daemon'"
                )
                ticks = (await world_state(store, world_id))[1]
                await poll(lambda t=ticks: _ticks_at_least(store, world_id, t + 2), timeout=30, what="ticks go on")
            assert killed_mid_tick >= 3
            assert daemon.proc.poll() is None, daemon.tail()
            retried = [e for e in daemon.events("retrying") if e["operation"] in ("tick", "world_discovery")]
            assert retried, daemon.tail()
            assert all(e["error"].startswith("OperationalError") for e in retried)

            # Stop while a tick hangs in the database: the stop waits for it only up to the
            # tick timeout (2 s), not the 60 s it would take; nothing of it is committed.
            await slow_ticks(store, 60)
            poll_sync(lambda: ticks_in_flight(admin), timeout=30, what="a stuck tick", interval=0.01)
            before = await world_state(store, world_id)
            mark = notify.mark()
            daemon.signal(signal.SIGTERM)
            notify.wait_for("STOPPING", after=mark)
            assert poll_sync(lambda: daemon.proc.poll() is not None, timeout=30, what="the daemon to exit")
        assert daemon.proc.returncode == 0, daemon.tail()
        assert [e["world_id"] for e in daemon.events("tick_timed_out")] == [world_id]
        assert await world_state(store, world_id) == before
    finally:
        daemon.kill()
        # A killed client's backend may still sit in pg_sleep holding its row lock.
        with psycopg.connect(libpq, autocommit=True) as admin:
            ticks_in_flight(admin, "pg_terminate_backend")
        async with store.transaction() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS inject_fault ON world_states"))


@pytest.mark.parametrize(
    ("config", "env", "exit_code", "message"),
    [
        (
            "[scheduler]\ntick_timeout_seconds = 0\n",
            {},
            2,
            "invalid configuration: {config}: scheduler.tick_timeout_seconds: Input should be greater than 0",
        ),
        ('[scheduler]\nbehavior = "no_such_module:decide"\n', {}, 2, "scheduler.behavior: "),
        (
            "[database]\nconnect_retry_seconds = 1\nconnect_timeout_seconds = 1\n",
            {"SCHEDULER_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:1/nothing"},
            3,
            "database unreachable after 1s of retries (database.connect_retry_seconds): OperationalError: ",
        ),
    ],
    ids=["config", "behavior", "database-unreachable"],
)
def test_startup_failure_is_one_line_and_an_exit_code(
    tmp_path: Path, notify: NotifySocket, config: str, env: dict[str, str], exit_code: int, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config)
    full_env = daemon_env(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", notify)
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", "run", "--config", str(path)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scheduler-daemon: error: " + message.format(config=path)), last
    notify.mark()
    assert notify.count("READY") == 0
    if exit_code == 3:
        # Every attempt is logged before giving up.
        lines = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
        attempts = [e for e in lines if e["event"] == "retrying" and e["operation"] == "database_connection"]
        assert attempts and all(a["level"] == "warning" for a in attempts)


async def _ticks_at_least(store: Store, world_id: int, n: int) -> bool:
    return (await world_state(store, world_id))[1] >= n


def _ts(line: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(line["timestamp"]).timestamp()


@pytest.mark.postgres
async def test_second_stop_signal_exits_at_once(
    pg_store: Store, pg_database_url: str, notify: NotifySocket, tmp_path: Path
) -> None:
    store = pg_store
    world_id, _ = await make_world(store, simulation={"tickIntervalSeconds": 0.2}, npcs_per_tier={Tier.ACTIVE: 1})
    await slow_ticks(store, 60)  # the first tick hangs in the database
    config = tmp_path / "config.toml"
    config.write_text(config_text("INFO", "tick_timeout_seconds = 120\n"))
    daemon = DaemonProcess(tmp_path, daemon_env(pg_database_url, notify), config)
    libpq = pg_database_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        notify.wait_for("READY", after=0)
        with psycopg.connect(libpq, autocommit=True) as admin:
            poll_sync(lambda: ticks_in_flight(admin), timeout=30, what="a stuck tick", interval=0.01)
        daemon.signal(signal.SIGTERM)
        # The first signal waits for the in-flight tick (up to 120 s here) ...
        poll_sync(lambda: daemon.events("inflight_ticks_waiting"), timeout=30, what="the drain to begin")
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        # ... the second one does not.
        poll_sync(lambda: daemon.proc.poll() is not None, timeout=10, what="the daemon to exit")
        assert daemon.proc.returncode == 1
        assert daemon.events("second_stop_signal")
        assert await world_state(store, world_id) == (0.0, 0)  # the interrupted tick left no trace
    finally:
        daemon.kill()
        # A killed client's backend may still sit in pg_sleep holding its row lock.
        with psycopg.connect(libpq, autocommit=True) as admin:
            ticks_in_flight(admin, "pg_terminate_backend")
        async with store.transaction() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS inject_fault ON world_states"))
