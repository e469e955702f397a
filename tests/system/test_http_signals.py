"""The embedded uvicorn server leaves the process's signals to the daemon.

``EmbeddedServer`` overrides ``uvicorn.Server.capture_signals``, which uvicorn
does not document: these tests fail if an uvicorn release stops calling it
(its signal handlers would replace the daemon's while the server runs, and its
restore on exit would leave SIGTERM at the default, killing the daemon mid-drain).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from scheduler_daemon.http.connections import ConnectionGuard
from scheduler_daemon.http.server import bind_socket, serving

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handlers() -> dict[int, object]:
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


@pytest.fixture
async def daemon_signals() -> AsyncIterator[dict[int, asyncio.Event]]:
    """The daemon's way: loop signal handlers for SIGTERM, SIGINT and SIGHUP, each setting an event."""
    loop = asyncio.get_running_loop()
    received = {sig: asyncio.Event() for sig in SIGNALS}
    for sig, event in received.items():
        loop.add_signal_handler(sig, event.set)
    try:
        yield received
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


async def test_signals_reach_the_daemons_handlers_while_the_server_serves_and_after(
    daemon_signals: dict[int, asyncio.Event],
) -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    installed = handlers()
    guard = ConnectionGuard(max_connections=10, request_timeout_seconds=5)
    async with serving(app, bind_socket("127.0.0.1", 0), guard) as server:
        assert handlers() == installed, "the HTTP server replaced the process's signal handlers"
        for sig in SIGNALS:
            os.kill(os.getpid(), sig)
            await asyncio.wait_for(daemon_signals[sig].wait(), timeout=10)
        assert not server.server.should_exit, "uvicorn took a signal as its own stop"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/ping")).json() == {"ok": True}
    assert handlers() == installed, "stopping the HTTP server changed the process's signal handlers"
