"""The connection guard on a real server on a loopback socket: deadlines, the limit, eviction, metrics.

Each test serves a small FastAPI app through ``serving(..., guard)`` exactly as
the daemon does, and talks to it over raw sockets, so that what a client sees
(an answer, a closed connection) is what is asserted. Timeouts are small
(0.5 s) to keep the tests fast; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from scheduler_daemon.http.connections import (
    ACCEPT_OUT_OF_RESOURCES,
    AcceptErrorHandler,
    ConnectionGuard,
    fit_connection_limit,
    raise_open_files_limit,
)
from scheduler_daemon.http.server import HttpServer, bind_socket, serving
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.metrics_exposition import expose

DEADLINE = 0.5
#: Generous bound for anything that should happen at once or at a deadline (a loaded 2-core machine).
SLACK = 5.0
PING = b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n"
SLOW = b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n"


@dataclass
class Site:
    """The test app's server, the guard, and control over ``/slow`` (it answers once released)."""

    server: HttpServer
    guard: ConnectionGuard
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: int = 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.server.port)


@contextlib.asynccontextmanager
async def site(max_connections: int = 10, request_timeout_seconds: float = DEADLINE) -> AsyncIterator[Site]:
    guard = ConnectionGuard(max_connections=max_connections, request_timeout_seconds=request_timeout_seconds)
    app = FastAPI()
    holder: list[Site] = []

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        holder[0].slow_started += 1
        await holder[0].release.wait()
        return {"ok": True}

    async with serving(app, bind_socket("127.0.0.1", 0), guard) as server:
        holder.append(Site(server, guard))
        try:
            yield holder[0]
        finally:
            holder[0].release.set()  # the server's graceful stop waits for requests in progress


async def wait_until(predicate: Callable[[], object], what: str, timeout: float = SLACK) -> None:
    """Bounded polling on the running loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def response(reader: asyncio.StreamReader) -> int:
    """Read one response; its status code."""
    async with asyncio.timeout(SLACK):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Wait until the server closes the connection (a reset counts); what it sent until then."""
    data = b""
    try:
        async with asyncio.timeout(SLACK):
            while chunk := await reader.read(4096):
                data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {SLACK}s")
    return data


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the connection still serves a request."""
    writer.write(PING)
    return await response(reader) == 200


# ------------------------------------------------------------------ deadline
async def test_an_idle_connection_is_closed_at_the_request_deadline() -> None:
    async with site() as s:
        started = time.monotonic()
        reader, writer = await s.connect()
        assert await closed(reader) == b""
        elapsed = time.monotonic() - started
        writer.close()
        assert elapsed >= DEADLINE - 0.01, f"closed after {elapsed:.3f}s, before the deadline"
        assert s.guard.closed == {"timeout": 1, "evicted": 0, "refused": 0}
        await wait_until(lambda: s.guard.open_connections == 0, "the guard to forget the connection")


async def test_headers_trickled_one_byte_per_second_are_cut_at_the_deadline() -> None:
    deadline = 2.5
    async with site(request_timeout_seconds=deadline) as s:
        started = time.monotonic()
        reader, writer = await s.connect()
        writer.write(b"GET /ping HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        trickled = 0

        async def trickle() -> None:
            nonlocal trickled
            while True:
                await asyncio.sleep(1.0)  # the slow client's pace
                writer.write(b"a")
                trickled += 1

        trickler = asyncio.create_task(trickle())
        try:
            answered = await closed(reader)
        finally:
            trickler.cancel()
            writer.close()
        elapsed = time.monotonic() - started
        assert answered == b""
        assert elapsed >= deadline - 0.01, f"closed after {elapsed:.3f}s, before the deadline"
        assert trickled >= 2, "the bytes kept arriving and did not extend the deadline"
        assert s.guard.closed["timeout"] == 1


async def test_requests_are_served_and_the_next_one_must_also_arrive_in_time() -> None:
    async with site() as s:
        reader, writer = await s.connect()
        writer.write(PING)
        assert await response(reader) == 200
        writer.write(PING)
        assert await response(reader) == 200
        assert s.guard.closed == {"timeout": 0, "evicted": 0, "refused": 0}
        # The first byte after a response starts the deadline again.
        started = time.monotonic()
        writer.write(b"GET /ping HTTP/1.1\r\n")
        assert await closed(reader) == b""
        writer.close()
        assert time.monotonic() - started >= DEADLINE - 0.01
        assert s.guard.closed["timeout"] == 1


# --------------------------------------------------------------------- limit
async def test_at_the_limit_the_connection_idle_longest_makes_room_for_a_new_client() -> None:
    async with site(max_connections=2, request_timeout_seconds=30) as s:
        oldest_reader, oldest = await s.connect()
        await wait_until(lambda: s.guard.open_connections == 1, "the first connection")
        other_reader, other = await s.connect()
        await wait_until(lambda: s.guard.open_connections == 2, "the second connection")
        reader, writer = await s.connect()
        writer.write(PING)
        assert await response(reader) == 200
        assert await closed(oldest_reader) == b""
        assert s.guard.closed == {"timeout": 0, "evicted": 1, "refused": 0}
        assert await still_open(other_reader, other)
        for w in (oldest, other, writer):
            w.close()


async def test_at_the_limit_with_every_request_in_progress_a_new_connection_is_closed_at_once() -> None:
    async with site(max_connections=2, request_timeout_seconds=30) as s:
        busy = [await s.connect() for _ in range(2)]
        for _, writer in busy:
            writer.write(SLOW)
        await wait_until(lambda: s.slow_started == 2, "both slow requests to start")
        started = time.monotonic()
        reader, writer = await s.connect()
        writer.write(PING)
        assert await closed(reader) == b""
        assert time.monotonic() - started < SLACK
        writer.close()
        assert s.guard.closed == {"timeout": 0, "evicted": 0, "refused": 1}
        s.release.set()
        for busy_reader, busy_writer in busy:
            assert await response(busy_reader) == 200, "a request in progress was cut"
            busy_writer.close()


async def test_a_request_waiting_unread_is_in_progress_and_not_evicted() -> None:
    async with site(max_connections=1, request_timeout_seconds=30) as s:
        # Both connect (the kernel completes the handshakes) before the server's loop runs
        # again, so both arrive in one accept round, the first one's request still unread.
        first = socket.create_connection(("127.0.0.1", s.server.port))
        first.sendall(PING)
        second = socket.create_connection(("127.0.0.1", s.server.port))
        first_reader, first_writer = await asyncio.open_connection(sock=first)
        second_reader, second_writer = await asyncio.open_connection(sock=second)
        assert await response(first_reader) == 200
        assert await closed(second_reader) == b""
        assert s.guard.closed == {"timeout": 0, "evicted": 0, "refused": 1}
        first_writer.close()
        second_writer.close()


async def test_the_metrics_follow_the_guard() -> None:
    async with site(max_connections=1) as s:
        metrics = SchedulerMetrics(version="t", http_connections=s.guard, process_collectors=False)
        # A connection that never sends: closed at the deadline.
        reader, writer = await s.connect()
        await closed(reader)
        writer.close()
        # A request in progress holds the only slot: a newcomer is refused.
        slow_reader, slow_writer = await s.connect()
        slow_writer.write(SLOW)
        await wait_until(lambda: s.slow_started == 1, "the slow request to start")
        reader, writer = await s.connect()
        await closed(reader)
        writer.close()
        # Once answered it idles and makes room for the next client.
        s.release.set()
        assert await response(slow_reader) == 200
        reader, writer = await s.connect()
        writer.write(PING)
        assert await response(reader) == 200
        assert await closed(slow_reader) == b""
        families = {f.name: f for f in text_string_to_metric_families(expose(metrics.snapshot()).body.decode())}
        closed_by_reason = {
            sample.labels["reason"]: sample.value
            for sample in families["worldsched_http_connections_closed"].samples
            if sample.name.endswith("_total")
        }
        assert closed_by_reason == {"timeout": 1, "evicted": 1, "refused": 1}
        assert families["worldsched_http_connections"].samples[0].value == 1
        assert families["worldsched_http_accept_errors"].samples[0].value == 0
        writer.close()
        slow_writer.close()


# ------------------------------------------------------------ accept errors
async def test_accept_failing_for_lack_of_descriptors_is_counted_and_logged_once() -> None:
    """Real EMFILE: the process's soft limit is lowered to its lowest free descriptor for a moment."""
    loop = asyncio.get_running_loop()
    async with site() as s:
        handler = AcceptErrorHandler(s.guard, interval_seconds=60)
        handler.install(loop)
        clients = [socket.socket() for _ in range(3)]  # opened before the limit drops
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            with capture_logs() as logs:
                lowest_free = os.dup(0)
                os.close(lowest_free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                try:
                    for client in clients:
                        client.setblocking(False)
                        client.connect_ex(("127.0.0.1", s.server.port))
                    await wait_until(lambda: s.guard.accept_errors > 0, "accept() to fail")
                    first_round = s.guard.accept_errors
                    # asyncio retries a second later: another round, still no second warning.
                    await wait_until(lambda: s.guard.accept_errors > first_round, "the retry to fail too")
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        finally:
            handler.uninstall(loop)
            for client in clients:
                client.close()
        warnings = [line for line in logs if line["log_level"] == "warning"]
        assert len(warnings) == 1, logs
        assert warnings[0]["error"] == "EMFILE"
        assert not [line for line in logs if line["log_level"] == "error"], "a traceback was logged"


async def test_accept_errors_log_at_most_once_per_interval_and_other_errors_pass_through() -> None:
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(max_connections=1, request_timeout_seconds=1)
    forwarded: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: forwarded.append(context))
    handler = AcceptErrorHandler(guard, interval_seconds=0.2)
    handler.install(loop)
    emfile = {"message": ACCEPT_OUT_OF_RESOURCES, "exception": OSError(errno.EMFILE, "Too many open files")}
    try:
        with capture_logs() as logs:
            for _ in range(100):
                loop.call_exception_handler(emfile)
            await asyncio.sleep(0.25)  # the interval itself is what is tested
            loop.call_exception_handler(
                {
                    "message": "Exception in callback BaseSelectorEventLoop._accept_connection()",
                    "exception": OSError(errno.ENFILE, "Too many open files in system"),
                }
            )
            loop.call_exception_handler({"message": "Task exception was never retrieved"})
    finally:
        handler.uninstall(loop)
    assert guard.accept_errors == 101
    assert [(line["error"], line["not_logged_since_last_warning"]) for line in logs] == [("EMFILE", 0), ("ENFILE", 99)]
    assert [c["message"] for c in forwarded] == ["Task exception was never retrieved"]
    assert loop.get_exception_handler() is not handler, "uninstall puts the previous handler back"
    loop.set_exception_handler(None)


# ---------------------------------------------------------- open-files limit
def test_the_connection_limit_fits_the_open_files_limit() -> None:
    assert fit_connection_limit(100, soft_limit=65536, reserved=220) == 100
    assert fit_connection_limit(100, soft_limit=256, reserved=220) == 36
    assert fit_connection_limit(100, soft_limit=200, reserved=220) == 1
    assert fit_connection_limit(100, soft_limit=resource.RLIM_INFINITY, reserved=220) == 100


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"needs a finite hard open-files limit of at least 512 (got {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    try:
        assert raise_open_files_limit() == (hard // 2, hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_open_files_limit() == (hard, hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_guard_needs_a_positive_limit_and_timeout() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionGuard(max_connections=0, request_timeout_seconds=1)
    with pytest.raises(ValueError, match="request_timeout_seconds"):
        ConnectionGuard(max_connections=1, request_timeout_seconds=0)
