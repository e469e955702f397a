"""Fault 8: a flood of idle and slowloris connections on the HTTP port must not starve the ticks.

The daemon runs with its open-files limit (soft and hard) at ``FD_LIMIT``, so it
cannot raise it. For ``FLOOD_SECONDS`` the test holds ``IDLE_CONNECTIONS`` idle
connections to its HTTP port, far more than that limit (each one reconnects
as soon as the daemon closes it), plus ``SLOWLORIS`` connections that trickle
one header byte per second and never finish their headers, while it scrapes
``/metrics`` on a fresh connection every ``SCRAPE_INTERVAL_SECONDS``, exactly
as it did during the baseline window before the flood.

The control plane must not starve the data plane: the healthy worlds keep at
least 90 % of their baseline tick rate, every scrape answers within
``SCRAPE_LIMIT_SECONDS``, the daemon stays up, its log stays small, the
connection guard's counters show what it closed, the audit finds nothing and
the daemon stops with 0. The daemon runs with the shipped ``[http]`` defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    poll,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

WORLD: dict[str, Any] = {"timeScale": 60.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
NPCS = {Tier.DETAILED: 2, Tier.ACTIVE: 2, Tier.AMBIENT: 2}
HEALTHY_WORLDS = 3
#: The daemon's RLIMIT_NOFILE, soft and hard.
FD_LIMIT = 384
IDLE_CONNECTIONS = 1000
SLOWLORIS = 50
BASELINE_SECONDS = 8.0
FLOOD_SECONDS = 18.0
#: Time for the flood to reach the daemon before the measured window starts.
RAMP_SECONDS = 2.0
SCRAPE_INTERVAL_SECONDS = 0.5
SCRAPE_LIMIT_SECONDS = 5.0
MIN_TICK_RATE_RATIO = 0.9
#: What the daemon may log during the flood (it logged ~150 MB in 40 s before the guard).
LOG_LIMIT_BYTES = 64 * 1024
LOG_LIMIT_LINES = 200


# ------------------------------------------------------------------ flood
@dataclass
class FloodCounts:
    connects: int = 0
    connect_errors: int = 0
    closed_by_daemon: int = 0
    slowloris_connects: int = 0
    slowloris_closed_by_daemon: int = 0


class Flood:
    """Idle and slowloris connections to one port, on an event loop in a thread of its own."""

    def __init__(self, port: int, *, idle: int, slowloris: int) -> None:
        self.port = port
        self.idle = idle
        self.slowloris = slowloris
        self.counts = FloodCounts()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), name="flood")

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the flood did not stop"
        self._loop.close()

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._idle()) for _ in range(self.idle)]
        tasks += [asyncio.create_task(self._slowloris()) for _ in range(self.slowloris)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A new connection, or None once the flood stops."""
        while not self._stop.is_set():
            try:
                return await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.counts.connect_errors += 1
                await asyncio.sleep(0.1)  # the attacker's own pace after a refused connect
        return None

    async def _idle(self) -> None:
        """Connect, send nothing, reconnect once the daemon closes the connection."""
        # Checked besides cancellation: a cancellation can get lost when a read completes at the same moment.
        while not self._stop.is_set():
            connection = await self._connect()
            if connection is None:
                return
            reader, writer = connection
            self.counts.connects += 1
            with contextlib.suppress(OSError):
                await reader.read(1)  # b"" once the daemon closes it
            writer.close()
            self.counts.closed_by_daemon += 1

    async def _slowloris(self) -> None:
        """Connect, then one byte of an endless header line per second."""
        while not self._stop.is_set():
            connection = await self._connect()
            if connection is None:
                return
            reader, writer = connection
            self.counts.slowloris_connects += 1
            with contextlib.suppress(OSError):
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: flood\r\nX-Slow: ")
                while not self._stop.is_set():
                    try:
                        async with asyncio.timeout(1.0):
                            if await reader.read(1) == b"":
                                break
                    except TimeoutError:
                        writer.write(b"a")
            writer.close()
            self.counts.slowloris_closed_by_daemon += 1


# ------------------------------------------------------------ observation
@dataclass
class Window:
    """What one measured window saw: committed ticks of the healthy worlds, scrapes of ``/metrics``."""

    seconds: float = 0.0
    ticks: int = 0
    scrapes: int = 0
    scrape_failures: list[str] = field(default_factory=list)
    scrape_max_seconds: float = 0.0
    last_metrics: str = ""

    @property
    def tick_rate(self) -> float:
        return self.ticks / self.seconds if self.seconds > 0 else 0.0


class FdSampler:
    """The most file descriptors a process held, sampled every 10 ms in a thread (Linux ``/proc``)."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/fd")
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd-sampler")

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError):
                self.max = max(self.max, sum(1 for _ in self.path.iterdir()))

    def __enter__(self) -> FdSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def observe(db: FaultDatabase, worlds: list[int], port: int, seconds: float) -> Window:
    """Scrape ``/metrics`` on a fresh connection every SCRAPE_INTERVAL_SECONDS for ``seconds``; count ticks."""
    window = Window()
    ticks_before = sum(db.ticks()[w] for w in worlds)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        scrape_started = time.monotonic()
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2 * SCRAPE_LIMIT_SECONDS)
            if response.status_code == 200:
                window.last_metrics = response.text
            else:
                window.scrape_failures.append(f"status {response.status_code}")
        except httpx.HTTPError as exc:
            window.scrape_failures.append(f"{type(exc).__name__}: {exc}")
        took = time.monotonic() - scrape_started
        window.scrapes += 1
        window.scrape_max_seconds = max(window.scrape_max_seconds, took)
        time.sleep(max(0.0, SCRAPE_INTERVAL_SECONDS - took))  # the scrape pace, not a wait for a condition
    window.seconds = time.monotonic() - started
    window.ticks = sum(db.ticks()[w] for w in worlds) - ticks_before
    return window


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from the Prometheus text format (``None``: not exported)."""
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(rendered) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else None


@contextlib.contextmanager
def open_files_raised() -> Iterator[None]:
    """The test process holds over a thousand sockets: its soft open-files limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + SLOWLORIS + 256
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the open-files hard limit ({hard}) is below the {needed} the flood needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connection_flood_does_not_starve_ticks_or_metrics(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    worlds = seed_worlds(db, HEALTHY_WORLDS, simulation=WORLD, npcs_per_tier=NPCS)
    config = write_config(tmp_path / "config.toml", http={"bind": "127.0.0.1", "port": 0})
    log_path = tmp_path / "daemon.log"
    with (
        open_files_raised(),
        running_daemon(config, daemon_env(db.url), log_path, open_files_limit=FD_LIMIT) as daemon,
    ):
        port = daemon.http_port()
        # It could not raise its limit, and the shipped connection limit fits.
        (limits,) = daemon.events("open_files_limit")
        assert (limits["soft"], limits["hard"]) == (FD_LIMIT, FD_LIMIT), limits
        assert daemon.events("http_listening")[0]["max_connections"] == 100
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        baseline = observe(db, worlds, port, BASELINE_SECONDS)
        with Flood(port, idle=IDLE_CONNECTIONS, slowloris=SLOWLORIS) as flood:
            poll(
                lambda: flood.counts.connects >= IDLE_CONNECTIONS // 10,
                timeout=RAMP_SECONDS * 5,
                what="the flood to reach the daemon",
            )
            log_size, log_lines = log_path.stat().st_size, len(daemon.log_lines())
            with FdSampler(daemon.pid) as fds:
                flooded = observe(db, worlds, port, FLOOD_SECONDS)
            log_bytes = log_path.stat().st_size - log_size
            log_lines = len(daemon.log_lines()) - log_lines
            alive_during_flood = daemon.alive()
        counts = flood.counts
        if alive_during_flood:
            wait_for_progress(db, worlds, timeout=30, what="ticks after the flood")
        after = observe(db, worlds, port, 1.0) if daemon.alive() else Window()
        code = daemon.stop()

    closed = {
        reason: metric(after.last_metrics, "worldsched_http_connections_closed_total", reason=reason)
        for reason in ("timeout", "evicted", "refused")
    }
    accept_errors = metric(after.last_metrics, "worldsched_http_accept_errors_total")
    ratio = flooded.tick_rate / baseline.tick_rate if baseline.tick_rate else 0.0
    report = check_invariants(db, {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds})
    record_result(
        "http-flood",
        backend=db.backend,
        fd_limit=FD_LIMIT,
        idle_connections=IDLE_CONNECTIONS,
        slowloris=SLOWLORIS,
        baseline_ticks_per_second=round(baseline.tick_rate, 2),
        flood_ticks_per_second=round(flooded.tick_rate, 2),
        flood_ticks=flooded.ticks,
        flood_seconds=round(flooded.seconds, 1),
        tick_rate_ratio=round(ratio, 3),
        scrapes=flooded.scrapes,
        scrape_failures=len(flooded.scrape_failures),
        scrape_max_seconds=round(flooded.scrape_max_seconds, 2),
        baseline_scrape_max_seconds=round(baseline.scrape_max_seconds, 2),
        daemon_fds_max=fds.max,
        log_bytes_during_flood=log_bytes,
        log_lines_during_flood=log_lines,
        flood=counts.__dict__,
        guard_closed=closed,
        accept_errors=accept_errors,
        exit_code=code,
        violations=len(report.violations),
    )
    assert alive_during_flood, daemon.log_tail()
    assert ratio >= MIN_TICK_RATE_RATIO, (
        f"ticks during the flood: {flooded.tick_rate:.2f}/s, baseline {baseline.tick_rate:.2f}/s"
    )
    assert flooded.scrape_failures == [], flooded.scrape_failures[:5]
    assert flooded.scrape_max_seconds <= SCRAPE_LIMIT_SECONDS, f"slowest scrape {flooded.scrape_max_seconds:.1f}s"
    assert log_bytes <= LOG_LIMIT_BYTES and log_lines <= LOG_LIMIT_LINES, (log_bytes, log_lines)
    # The guard did the closing: idle connections evicted, slowloris cut at the request deadline.
    assert counts.closed_by_daemon > 0 and counts.slowloris_closed_by_daemon > 0, counts
    assert (closed["evicted"] or 0) > 0 and (closed["timeout"] or 0) > 0, closed
    assert code == 0, daemon.log_tail()
    assert report.violations == [], "\n".join(report.violations)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_connection_limit_beyond_the_open_files_limit_is_lowered_with_a_warning(
    fault_db: FaultDatabase, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.toml", http={"bind": "127.0.0.1", "port": 0})
    with running_daemon(config, daemon_env(fault_db.url), tmp_path / "daemon.log", open_files_limit=256) as daemon:
        port = daemon.http_port()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        (warning,) = daemon.events("http_max_connections_lowered")
        listening = daemon.events("http_listening")[0]
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    # 256 - (database pools 16 + 8 + lease pool 4 + change listener 1 + connections being accepted 128 + other 64)
    assert warning["max_connections"] == 100 and warning["effective_max_connections"] == 35, warning
    assert warning["open_files_limit"] == 256 and warning["level"] == "warning"
    assert listening["max_connections"] == 35
