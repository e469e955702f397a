"""Bounded HTTP connections: the admin port must never starve the ticks.

Every connection to the daemon's HTTP port is a :class:`GuardedConnection`, an
asyncio protocol wrapped around uvicorn's :class:`~uvicorn.protocols.http.h11_impl.H11Protocol`
(passed to uvicorn as its documented ``Config(http=...)`` protocol class). One
:class:`ConnectionGuard` per server counts the live connections and enforces:

* **a request deadline**: from accept, and from the first byte received after
  the server wrote a response, the server must start writing a response within
  ``request_timeout_seconds``, else the connection is closed. This covers
  sockets that never send anything, headers trickled a byte at a time and slow
  bodies alike. The wrapper sees "the server wrote" through a thin transport
  proxy it hands to the inner protocol. An idle keep-alive connection after a
  response is left to uvicorn's ``timeout_keep_alive``.
* **a connection limit**: a connection arriving while ``max_connections`` are
  open evicts the connection idle longest (nothing received since accept or
  since its last response, nothing waiting unread in the kernel, nothing left
  to send); if every open connection has a request in progress, the newcomer
  is closed at once. A scraper thus always gets in
  during a flood of idle connections, and slow senders hold a slot for at most
  the request deadline. Closing aborts the transport, so the file descriptor
  is released right away.

:class:`AcceptErrorHandler` keeps ``accept()`` failures for lack of file
descriptors or memory from flooding the log, and :func:`raise_open_files_limit`
/ :func:`fit_connection_limit` size the limit to the process's open-files limit.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import resource
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeAlias, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

from scheduler_daemon.logs import get_logger

log = get_logger("scheduler_daemon.http")

#: Why the guard closed a connection (the ``reason`` label of ``worldsched_http_connections_closed_total``).
CloseReason = Literal["timeout", "evicted", "refused"]
CLOSE_REASONS: tuple[CloseReason, ...] = ("timeout", "evicted", "refused")

#: Backlog of the HTTP listening socket, small on purpose: asyncio accepts up to
#: this many connections per loop iteration before the guard sees any of them,
#: so it bounds both the descriptors in flight and how many newcomers can evict
#: a connection before its request is read.
LISTEN_BACKLOG = 32
#: Descriptors beyond the limit while connections arrive: a socket takes a few
#: loop iterations from accept() to the guard, and an evicted one another to be
#: released, with up to a backlog accepted in each iteration.
ACCEPT_PIPELINE_FDS = 4 * LISTEN_BACKLOG

#: What asyncio's accept loop reports (then retries after a second) when accept() fails for lack of resources.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most one warning per this many seconds about failing accepts.
ACCEPT_ERROR_LOG_INTERVAL_SECONDS = 10.0

ExceptionHandler: TypeAlias = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class ConnectionGuard:
    """The live connections of one HTTP server, their limit and their request deadline.

    Pass :attr:`protocol` to uvicorn (``Config(http=guard.protocol)``). The
    counters (:attr:`open_connections`, :attr:`closed`, :attr:`accept_errors`)
    are read by the metrics at scrape time.
    """

    def __init__(self, *, max_connections: int, request_timeout_seconds: float) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if not request_timeout_seconds > 0:
            raise ValueError(f"request_timeout_seconds must be positive, got {request_timeout_seconds}")
        self.max_connections = max_connections
        self.request_timeout_seconds = request_timeout_seconds
        #: Connections the guard closed, per reason.
        self.closed: dict[CloseReason, int] = dict.fromkeys(CLOSE_REASONS, 0)
        #: accept() failures for lack of file descriptors or memory (counted by :class:`AcceptErrorHandler`).
        self.accept_errors = 0
        self._open: set[GuardedConnection] = set()
        # Open connections without a request in progress, the one idle longest first.
        self._idle: OrderedDict[GuardedConnection, None] = OrderedDict()
        guard = self

        class Connection(GuardedConnection):
            def __init__(self, **uvicorn_kwargs: Any) -> None:
                super().__init__(guard, **uvicorn_kwargs)

        #: The protocol class for uvicorn: a :class:`GuardedConnection` bound to this guard.
        self.protocol: type[asyncio.Protocol] = Connection

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (those the guard is closing no longer count)."""
        return len(self._open)

    def _admit(self, conn: GuardedConnection) -> bool:
        """Admit ``conn``, at the limit by evicting the connection idle longest; False: refused."""
        if len(self._open) >= self.max_connections:
            victim = self._evictable()
            if victim is None:
                self.closed["refused"] += 1
                return False
            self.close(victim, "evicted")
        self._open.add(conn)
        self._idle[conn] = None
        return True

    def _evictable(self) -> GuardedConnection | None:
        # Idle in the guard's view but with a response still in the write buffer
        # or a request not yet read: in progress after all.
        for conn in self._idle:
            if conn.write_buffer_size() == 0 and not conn.request_waiting():
                return conn
        return None

    def _request_started(self, conn: GuardedConnection) -> None:
        self._idle.pop(conn, None)

    def _response_started(self, conn: GuardedConnection) -> None:
        if conn in self._open:
            self._idle.pop(conn, None)
            self._idle[conn] = None  # idle from now: last in line for eviction

    def _forget(self, conn: GuardedConnection) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)

    def close(self, conn: GuardedConnection, reason: CloseReason) -> None:
        """Close ``conn`` now (its file descriptor is released at once) and count it under ``reason``."""
        if conn in self._open:
            self._forget(conn)
            self.closed[reason] += 1
            conn.abort()


class _WriteWatchingTransport:
    """The transport as the inner protocol sees it: every write tells the connection a response started."""

    def __init__(self, transport: asyncio.Transport, conn: GuardedConnection) -> None:
        self._transport = transport
        self._conn = conn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.response_started()
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._conn.response_started()
        self._transport.writelines(list_of_data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedConnection(asyncio.Protocol):
    """One HTTP connection: uvicorn's h11 protocol behind a :class:`ConnectionGuard`.

    Construct through :attr:`ConnectionGuard.protocol` (uvicorn passes its own
    keyword arguments, handed unchanged to ``H11Protocol``). The inner protocol
    is built only once the guard admits the connection.
    """

    def __init__(self, guard: ConnectionGuard, **uvicorn_kwargs: Any) -> None:
        self._guard = guard
        self._uvicorn_kwargs = uvicorn_kwargs
        self._inner: H11Protocol | None = None
        self._transport: asyncio.Transport | None = None
        # Armed while the server owes a response (from accept, and from the first byte after a response).
        self._deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if not self._guard._admit(self):
            self._transport.abort()
            return
        self._arm_deadline()
        self._inner = H11Protocol(**self._uvicorn_kwargs)
        # The proxy is no Transport subclass: Transport's own methods would shadow the delegation.
        self._inner.connection_made(cast(asyncio.Transport, _WriteWatchingTransport(self._transport, self)))

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        self._guard._request_started(self)
        if self._deadline is None:
            self._arm_deadline()
        self._inner.data_received(data)

    def eof_received(self) -> None:
        # None: the transport closes once the client has closed its side, as with H11Protocol alone.
        if self._inner is not None:
            self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard._forget(self)
        self._disarm_deadline()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # ------------------------------------------------------------ the guard's
    def response_started(self) -> None:
        """The server wrote to the connection: the request deadline is met, the connection idles again."""
        self._disarm_deadline()
        self._guard._response_started(self)

    def write_buffer_size(self) -> int:
        """Bytes written but not yet sent."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def request_waiting(self) -> bool:
        """Whether the client sent bytes that are not read yet (the kernel's receive queue, ``FIONREAD``)."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None:
            return False
        try:
            waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return bool(struct.unpack("i", waiting)[0])

    def abort(self) -> None:
        """Close at once, discarding unsent data (``connection_lost`` follows)."""
        self._disarm_deadline()
        if self._transport is not None:
            self._transport.abort()

    def _arm_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.request_timeout_seconds, self._guard.close, self, "timeout")

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


# --------------------------------------------------------- accept failures
class AcceptErrorHandler:
    """Event-loop exception handler that keeps failing accepts from flooding the log.

    asyncio's accept loop reports ``accept()`` failing with EMFILE, ENFILE,
    ENOBUFS or ENOMEM to the loop's exception handler (once per connection it
    tried to accept, with a traceback) and retries a second later. Here each
    one increments the guard's :attr:`~ConnectionGuard.accept_errors`, and at
    most one WARNING per ``interval_seconds`` says how many were not logged.
    Every other context goes to the handler installed before (or the loop's
    default handler).
    """

    def __init__(self, guard: ConnectionGuard, *, interval_seconds: float = ACCEPT_ERROR_LOG_INTERVAL_SECONDS) -> None:
        self.guard = guard
        self.interval_seconds = interval_seconds
        self._previous: ExceptionHandler | None = None
        self._last_logged: float | None = None
        self._suppressed = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become ``loop``'s exception handler, remembering the current one."""
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put the handler found by :meth:`install` back."""
        loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not _is_accept_resource_error(context):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.guard.accept_errors += 1
        now = time.monotonic()
        if self._last_logged is not None and now - self._last_logged < self.interval_seconds:
            self._suppressed += 1
            return
        exc = context.get("exception")
        code = exc.errno if isinstance(exc, OSError) and exc.errno is not None else None
        log.warning(
            "http_accept_failed",
            error=errno.errorcode.get(code, str(exc)) if code is not None else str(exc),
            open_connections=self.guard.open_connections,
            not_logged_since_last_warning=self._suppressed,
        )
        self._last_logged = now
        self._suppressed = 0


def _is_accept_resource_error(context: dict[str, Any]) -> bool:
    message = str(context.get("message", ""))
    if message == ACCEPT_OUT_OF_RESOURCES:
        return True
    exc = context.get("exception")
    return "accept" in message and isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


# ------------------------------------------------------- open-files budget
def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now, hard).

    Unchanged when the kernel refuses (an unlimited hard limit, above ``nr_open``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, hard, hard


def fit_connection_limit(max_connections: int, *, soft_limit: int, reserved: int) -> int:
    """The connection limit that fits the open-files limit: at most ``soft_limit - reserved``, at least 1.

    ``reserved`` counts every descriptor the daemon needs besides its HTTP
    connections (database pools, files, sockets, connections being accepted).
    """
    if soft_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft_limit - reserved))
