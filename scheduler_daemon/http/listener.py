"""The admin port as the daemon opens it: token, bound socket, connection guard, accept errors.

Opened before anything slow (a bad token file or a port in use fails the start
at once with one line) and served before ``READY=1``.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from scheduler_daemon.exits import EXIT_ADDRESS_IN_USE, EXIT_CONFIG, StartupError
from scheduler_daemon.http.auth import check_bind_allowed, load_admin_token
from scheduler_daemon.http.connections import (
    ACCEPT_PIPELINE_FDS,
    AcceptErrorHandler,
    ConnectionGuard,
    fit_connection_limit,
)
from scheduler_daemon.http.server import HttpBindError, HttpServer, bind_socket, bind_unix_socket
from scheduler_daemon.logs import get_logger
from scheduler_daemon.settings import HttpSettings, SettingsError

log = get_logger("scheduler_daemon.http")

#: Open files the daemon needs besides HTTP connections, database pools and accepting:
#: log, SQLite files, epoll, signal and notify sockets, the interpreter's own.
OTHER_OPEN_FILES = 64


def load_startup_token(http: HttpSettings) -> str | None:
    """The admin token at start (``None``: none configured); a bad one is a :class:`StartupError`."""
    try:
        token = load_admin_token(http)
        check_bind_allowed(http, token)
    except SettingsError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None
    return token


def connection_guard(http: HttpSettings, *, open_files: int, database_pools: int) -> ConnectionGuard:
    """The connection guard, its limit lowered if connections plus everything else exceed ``open_files``."""
    reserved = database_pools + ACCEPT_PIPELINE_FDS + OTHER_OPEN_FILES
    limit = fit_connection_limit(http.max_connections, soft_limit=open_files, reserved=reserved)
    if limit < http.max_connections:
        log.warning(
            "http_max_connections_lowered",
            hint="raise LimitNOFILE= or ulimit -n",
            max_connections=http.max_connections,
            effective_max_connections=limit,
            open_files_limit=open_files,
            reserved_database_pools=database_pools,
            reserved_accepting=ACCEPT_PIPELINE_FDS,
            reserved_other=OTHER_OPEN_FILES,
        )
    return ConnectionGuard(max_connections=limit, request_timeout_seconds=http.request_timeout_seconds)


class AdminListener:
    """The bound admin port and its guard; :meth:`serve` runs an app on it, :meth:`close` releases it.

    With ``unix_path`` (a worker of ``run --workers``) it listens on that Unix
    socket instead of ``[http] bind``/``port``, which the supervisor serves.
    """

    def __init__(
        self, http: HttpSettings, guard: ConnectionGuard, *, unix_path: Path | None = None, date_header: bool = True
    ) -> None:
        self.http = http
        self.guard = guard
        self.unix_path = unix_path
        self.date_header = date_header
        try:
            self.sock: socket.socket | None = (
                bind_socket(http.bind, http.port) if unix_path is None else bind_unix_socket(unix_path)
            )
        except HttpBindError as exc:
            raise StartupError(str(exc), EXIT_ADDRESS_IN_USE if exc.in_use else EXIT_CONFIG) from None
        self.server: HttpServer | None = None
        self._accept_errors: AcceptErrorHandler | None = None

    async def serve(self, app: Any, *, authenticated: bool) -> None:
        """Serve ``app``; returns once the port answers."""
        assert self.sock is not None
        self._accept_errors = AcceptErrorHandler(self.guard)
        self._accept_errors.install(asyncio.get_running_loop())
        self.server = HttpServer(app, self.sock, self.guard, date_header=self.date_header)
        await self.server.start()
        http = self.http
        host = http.bind if ":" not in http.bind else f"[{http.bind}]"
        where = (
            {"bind": http.bind, "port": self.server.port, "url": f"http://{host}:{self.server.port}"}
            if self.unix_path is None
            else {"socket": str(self.unix_path)}
        )
        log.info(
            "http_listening",
            **where,
            admin_auth="token" if authenticated else "none",
            max_connections=self.guard.max_connections,
            request_timeout_seconds=self.guard.request_timeout_seconds,
        )
        if not authenticated and self.unix_path is None:
            log.warning(
                "admin_api_unauthenticated",
                bind=http.bind,
            )

    async def close(self) -> None:
        """Stop serving (open requests finish) and release the port."""
        if self.server is not None:
            await self.server.stop()  # closes the socket
            self.server = None
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
        if self._accept_errors is not None:
            self._accept_errors.uninstall(asyncio.get_running_loop())
            self._accept_errors = None
