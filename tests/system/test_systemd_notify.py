"""Tests for the pure-Python sd_notify implementation and watchdog helpers.

These talk to real AF_UNIX datagram sockets (filesystem and abstract), so they
check the exact bytes systemd would receive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler_daemon.systemd import (
    SystemdNotifier,
    watchdog_interval_seconds,
    watchdog_loop,
)

RECV_TIMEOUT_S = 5.0


class Receiver:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def recv(self) -> bytes:
        """Return the next datagram, failing after a bounded wait."""
        self.sock.settimeout(RECV_TIMEOUT_S)
        return self.sock.recv(65536)

    def assert_empty(self) -> None:
        """Assert no datagram is queued (sendto is synchronous for AF_UNIX)."""
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        pytest.fail(f"unexpected datagram {data!r}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path is limited to 108 bytes; pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[Receiver]:
    path = short_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"scheduler-daemon-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


# --- construction ---------------------------------------------------------


def test_disabled_when_env_var_unset() -> None:
    notifier = SystemdNotifier(env={})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_disabled_when_env_var_empty() -> None:
    assert not SystemdNotifier(env={"NOTIFY_SOCKET": ""}).enabled


def test_relative_or_vsock_address_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scheduler_daemon.systemd"):
        assert not SystemdNotifier("relative/notify.sock").enabled
        assert not SystemdNotifier("vsock:2:1234").enabled
    assert [(r.getMessage(), r.notify_socket) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("notify_socket_unsupported", "relative/notify.sock"),
        ("notify_socket_unsupported", "vsock:2:1234"),
    ]


def test_reads_process_environment(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.socket_path == receiver.notify_socket
    assert notifier.notify("READY=1")
    assert receiver.recv() == b"READY=1"


def test_explicit_path_wins_over_env(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket, env={"NOTIFY_SOCKET": "/nonexistent"})
    assert notifier.notify("READY=1")
    assert receiver.recv() == b"READY=1"


# --- message contents -----------------------------------------------------


def test_notify_joins_fields_into_one_datagram(receiver: Receiver) -> None:
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": receiver.notify_socket})
    assert notifier.notify("READY=1", "STATUS=hello", "MAINPID=42")
    assert receiver.recv() == b"READY=1\nSTATUS=hello\nMAINPID=42"
    receiver.assert_empty()


def test_ready_without_and_with_status(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.ready()
    assert receiver.recv() == b"READY=1"
    assert notifier.ready("ticking 3 worlds")
    assert receiver.recv() == b"READY=1\nSTATUS=ticking 3 worlds"


def test_extend_timeout_in_microseconds_with_a_status(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.extend_timeout(30.0, "registering worlds: 250/10000")
    assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=registering worlds: 250/10000"
    assert notifier.extend_timeout(1.5)
    assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=1500000"


def test_stopping_and_watchdog(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.stopping()
    assert receiver.recv() == b"STOPPING=1"
    assert notifier.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"


def test_status_is_forced_onto_one_line(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.status("loading\nworld 7 \r\n\nfailed")
    assert receiver.recv() == b"STATUS=loading world 7 failed"


def test_status_utf8(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.status("Welt Ä läuft")
    assert receiver.recv() == "STATUS=Welt Ä läuft".encode()


def test_reloading_sends_monotonic_usec_in_same_datagram(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = receiver.recv().decode().split("\n")
    receiver.assert_empty()  # exactly one datagram
    assert len(lines) == 2
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": abstract_receiver.notify_socket})
    assert notifier.enabled
    assert notifier.ready("up")
    assert abstract_receiver.recv() == b"READY=1\nSTATUS=up"
    assert notifier.reloading()
    assert abstract_receiver.recv().startswith(b"RELOADING=1\nMONOTONIC_USEC=")


@pytest.mark.parametrize("bad", ["READY=1\nWATCHDOG=1", "READY"])
def test_malformed_field_is_not_sent(receiver: Receiver, bad: str) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    assert notifier.notify("STATUS=ok", bad) is False
    receiver.assert_empty()


def test_no_fields_is_not_sent(receiver: Receiver) -> None:
    assert SystemdNotifier(receiver.notify_socket).notify() is False
    receiver.assert_empty()


# --- failure handling -----------------------------------------------------


def test_missing_socket_logs_and_returns_false(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(str(short_dir / "absent.sock"))
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="scheduler_daemon.systemd"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # First failure of a streak is a warning, repeats are demoted to debug.
    assert len(warnings) == 1
    assert warnings[0].getMessage() == "sd_notify_failed" and warnings[0].fields == ["WATCHDOG"]  # type: ignore[attr-defined]


def test_recovers_after_failure(short_dir: Path) -> None:
    path = short_dir / "late.sock"
    notifier = SystemdNotifier(str(path))
    assert notifier.watchdog() is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notifier.watchdog() is True
        sock.settimeout(RECV_TIMEOUT_S)
        assert sock.recv(100) == b"WATCHDOG=1"


def test_full_receiver_queue_does_not_block(receiver: Receiver) -> None:
    """A stalled service manager must never block the daemon's event loop."""
    notifier = SystemdNotifier(receiver.notify_socket)
    results: list[bool] = []

    def flood() -> None:
        # net.unix.max_dgram_qlen (default 10) bounds the queue; a blocking
        # sender would hang here forever instead of getting False.
        for _ in range(10_000):
            ok = notifier.watchdog()
            results.append(ok)
            if not ok:
                return

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "notify() blocked on a full socket queue"
    assert results[-1] is False
    assert results.count(True) >= 1


# --- watchdog interval ----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 100, None),
        ({"WATCHDOG_USEC": "30000000"}, 100, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "100"}, 100, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "101"}, 100, None),
        ({"WATCHDOG_USEC": "1000"}, 100, 0.0005),
        ({"WATCHDOG_USEC": "abc"}, 100, None),
        ({"WATCHDOG_USEC": ""}, 100, None),
        ({"WATCHDOG_USEC": "0"}, 100, None),
        ({"WATCHDOG_USEC": "-5"}, 100, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, 100, None),
        ({"WATCHDOG_PID": "100"}, 100, None),
    ],
)
def test_watchdog_interval_seconds(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval_seconds(env, pid=pid) == expected


def test_watchdog_interval_defaults_to_own_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_seconds(env) == 1.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert watchdog_interval_seconds(env) is None


# --- watchdog loop --------------------------------------------------------


class ScriptedClock:
    """Fake ``sleep``: each call advances a scripted progress counter.

    After the script is exhausted the fake raises CancelledError, which is how
    the real loop is stopped (task cancellation during ``await sleep``).
    """

    def __init__(self, progress_after_each_sleep: list[int], start: int = 0) -> None:
        self._script = list(progress_after_each_sleep)
        self.value = start
        self.sleeps: list[float] = []

    def progress(self) -> int:
        return self.value

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if not self._script:
            raise asyncio.CancelledError
        self.value = self._script.pop(0)


def drain(receiver: Receiver) -> list[bytes]:
    receiver.sock.setblocking(False)
    out: list[bytes] = []
    while True:
        try:
            out.append(receiver.sock.recv(65536))
        except BlockingIOError:
            return out


async def test_watchdog_loop_pings_only_on_progress(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    # progress: 0 -> 1 (ping) -> 2 (ping) -> 2 (stalled) -> 2 (stalled) -> 5 (ping)
    clock = ScriptedClock([1, 2, 2, 2, 5])
    with pytest.raises(asyncio.CancelledError):
        await watchdog_loop(notifier, 15.0, clock.progress, sleep=clock.sleep)
    assert clock.sleeps == [15.0] * 6
    assert drain(receiver) == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_never_pings_when_wedged(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    clock = ScriptedClock([7, 7, 7], start=7)
    with (
        caplog.at_level(logging.WARNING, logger="scheduler_daemon.systemd"),
        pytest.raises(asyncio.CancelledError),
    ):
        await watchdog_loop(notifier, 2.5, clock.progress, sleep=clock.sleep)
    assert drain(receiver) == []
    assert [r.getMessage() for r in caplog.records] == ["watchdog_ping_withheld"] * 3


async def test_watchdog_loop_counter_going_backwards_is_not_progress(
    receiver: Receiver,
) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    clock = ScriptedClock([10, 3, 4, 11], start=0)
    with pytest.raises(asyncio.CancelledError):
        await watchdog_loop(notifier, 1.0, clock.progress, sleep=clock.sleep)
    # 0->10 ping; 3 and 4 are not above 10; 11 is.
    assert drain(receiver) == [b"WATCHDOG=1"] * 2


async def test_watchdog_loop_survives_failing_probe(receiver: Receiver) -> None:
    notifier = SystemdNotifier(receiver.notify_socket)
    calls = 0

    def progress() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("probe broke")
        return calls

    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps > 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await watchdog_loop(notifier, 1.0, progress, sleep=sleep)
    # progress samples: 1 (baseline), error (no ping), 3 (ping), 4 (ping)
    assert drain(receiver) == [b"WATCHDOG=1"] * 2


async def test_watchdog_loop_is_cancellable_with_real_sleep(receiver: Receiver) -> None:
    """Real asyncio.sleep: the task stops promptly when cancelled."""
    notifier = SystemdNotifier(receiver.notify_socket)
    counter = 0

    def progress() -> int:
        nonlocal counter
        counter += 1  # always making progress
        return counter

    task = asyncio.create_task(watchdog_loop(notifier, 0.01, progress))
    deadline = time.monotonic() + RECV_TIMEOUT_S
    # Bounded polling: wait for the first ping to prove the loop is running.
    receiver.sock.setblocking(False)
    got: bytes | None = None
    while got is None and time.monotonic() < deadline:
        try:
            got = receiver.sock.recv(100)
        except BlockingIOError:
            await asyncio.sleep(0.005)
    assert got == b"WATCHDOG=1"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=RECV_TIMEOUT_S)
    assert task.cancelled()


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
async def test_watchdog_loop_rejects_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        await watchdog_loop(SystemdNotifier(env={}), interval, lambda: 0)
