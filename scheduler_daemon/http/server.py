"""The HTTP server: the admin app served by uvicorn inside the daemon's own event loop.

The daemon binds the listening socket itself (so "address in use" is a clean
startup error and ``READY=1`` comes only once the port is bound) and keeps its
own signal handling: :class:`EmbeddedServer` never installs uvicorn's. Every
connection goes through a :class:`~scheduler_daemon.http.connections.ConnectionGuard`
(connection limit, request deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from scheduler_daemon.http.connections import LISTEN_BACKLOG, ConnectionGuard

#: Idle keep-alive connections are closed after this long. Longer than clients keep
#: them (httpx 5 s, uvicorn's own default 5 s): a client sending on a connection
#: the server is closing at the same moment gets a connection error, not an answer.
KEEP_ALIVE_SECONDS = 75


class HttpBindError(OSError):
    """The HTTP port could not be bound; ``in_use`` tells "address in use" apart."""

    def __init__(self, message: str, *, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: any free port), backlog ``LISTEN_BACKLOG``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HttpBindError(f"http.bind: cannot resolve {host!r}: {exc.strerror}", in_use=False) from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        in_use = exc.errno == errno.EADDRINUSE
        what = "address already in use" if in_use else (exc.strerror or str(exc))
        raise HttpBindError(f"http: cannot bind {host}:{port}: {what}", in_use=in_use) from None
    sock.setblocking(False)
    return sock


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind and listen on the Unix socket ``path`` (replacing a stale one), backlog ``LISTEN_BACKLOG``."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise HttpBindError(f"http: cannot bind {path}: {exc.strerror or exc}", in_use=False) from None
    sock.setblocking(False)
    return sock


class EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the daemon owns the signals."""

    # uvicorn documents no switch for this; pyproject.toml bounds uvicorn to the releases
    # tests/system/test_http_signals.py passed on, which fails if this override stops taking effect.
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpServer:
    """Runs the app on an already bound socket inside the current event loop.

    Every connection is a ``guard.protocol`` (uvicorn's h11 protocol behind the
    guard's connection limit and request deadline).
    """

    def __init__(self, app: Any, sock: socket.socket, guard: ConnectionGuard, *, date_header: bool = True) -> None:
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=guard.protocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # Off in front of workers: their answers carry their own Date, forwarded as is.
            date_header=date_header,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            # asyncio listens again with this (uvicorn's default is 2048): keep bind_socket's bound.
            backlog=LISTEN_BACKLOG,
        )
        self.server = EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        """Start serving; returns once the server accepts connections."""
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
        while not self.server.started:
            if self._task.done():
                await self._task  # raises the startup error
                raise RuntimeError("http server exited during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, finish open requests (uvicorn's graceful shutdown)."""
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket, guard: ConnectionGuard) -> AsyncIterator[HttpServer]:
    """Serve ``app`` on ``sock`` through ``guard`` for the duration of the block."""
    server = HttpServer(app, sock, guard)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
