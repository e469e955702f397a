"""The embedded HTTP server keeps idle keep-alive connections longer than clients do.

uvicorn's default (5 s) equals httpx's pool expiry (5 s), so a client could
send a request on a connection at the moment the server closes it as idle,
and get a connection error instead of an answer (the fault suite's load test
saw it: the daemon's event loop, busy with thousands of worlds, runs the
idle timer late, which widens the race). The server must outlast the client.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from scheduler_daemon.http.connections import ConnectionGuard
from scheduler_daemon.http.server import bind_socket, serving

#: Longer than uvicorn's and httpx's 5 s defaults, so the old server would have closed the connection.
IDLE_SECONDS = 6.0


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.read(4096), timeout=10)


async def test_idle_keep_alive_connection_still_serves_after_the_clients_expiry() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    # A request deadline shorter than the idle period: it must not apply to idle keep-alive.
    guard = ConnectionGuard(max_connections=100, request_timeout_seconds=1.0)
    async with serving(app, bind_socket("127.0.0.1", 0), guard) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert (await _get(reader, writer)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(IDLE_SECONDS)  # the idle period itself is what is tested
            again = await _get(reader, writer)
            assert again.startswith(b"HTTP/1.1 200"), f"idle connection closed by the server: {again!r}"
        finally:
            writer.close()
