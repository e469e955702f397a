"""Forward one HTTP request to a worker's admin socket and stream its answer back (``run --workers``).

The supervisor's port is an ASGI app; each request it forwards opens one
HTTP/1.1 connection (h11, uvicorn's own parser) to the worker's Unix socket,
streams the request body to it as it arrives and the response back as it
comes. Nothing is buffered or rewritten except the hop-by-hop headers, so the
worker enforces the token, the body limits and the request deadline exactly as
it does on its own port, and its status codes reach the client unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
from starlette.types import Receive, Scope, Send

#: Headers about one connection, never forwarded (RFC 9110 §7.6.1). ``host`` goes on: the worker
#: builds absolute URLs (a redirect's Location) from it, which must lead back to the client's port.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Bytes read from the worker at a time.
READ_CHUNK = 64 * 1024


class UpstreamUnavailable(Exception):
    """The worker could not be reached, or failed before its response started (nothing was sent to the client)."""


async def forward(socket_path: str, scope: Scope, receive: Receive, send: Send, *, wait_seconds: float) -> None:
    """Send the request of ``scope``/``receive`` to the worker at ``socket_path``; its answer goes to ``send``.

    ``wait_seconds`` bounds every wait on the worker (the response head, each body
    chunk). Raises :class:`UpstreamUnavailable` when nothing was sent to the
    client yet (the caller answers 503); a failure later cuts the response.
    """
    try:
        async with asyncio.timeout(wait_seconds):
            reader, writer = await asyncio.open_unix_connection(socket_path)
    except (OSError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"cannot connect: {exc}") from None
    conn = h11.Connection(h11.CLIENT)
    pump: asyncio.Task[None] | None = None
    started = False
    try:
        writer.write(conn.send(_request(scope)))
        pump = asyncio.create_task(_pump_body(conn, receive, writer))
        while True:
            try:
                async with asyncio.timeout(wait_seconds):
                    event = await _next_event(conn, reader)
            except (OSError, TimeoutError, h11.RemoteProtocolError) as exc:
                if started:
                    raise
                raise UpstreamUnavailable(f"no answer: {type(exc).__name__}: {exc}") from None
            if isinstance(event, h11.Response):
                headers = [(k, v) for k, v in event.headers if k not in HOP_BY_HOP]
                await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif isinstance(event, h11.ConnectionClosed):
                if started:
                    raise ConnectionError("worker closed the connection inside its response")
                raise UpstreamUnavailable("the worker closed the connection without answering")
            # InformationalResponse (100 Continue): the client's own server answered that already.
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _request(scope: Scope) -> h11.Request:
    incoming = scope.get("headers", [])
    # uvicorn decoded a chunked body: send it on chunked again (its length is not known up front). A
    # Content-Length beside Transfer-Encoding is not the body's length: dropped (RFC 9112 §6.3).
    chunked = any(k == b"transfer-encoding" for k, _ in incoming)
    dropped = HOP_BY_HOP | {b"content-length"} if chunked else HOP_BY_HOP
    headers = [(k, v) for k, v in incoming if k not in dropped]
    if not any(k == b"host" for k, _ in headers):
        headers.insert(0, (b"host", b"worker"))  # HTTP/1.0 without one: HTTP/1.1 needs one
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    return h11.Request(method=scope["method"], target=target, headers=headers)


async def _pump_body(conn: h11.Connection, receive: Receive, writer: asyncio.StreamWriter) -> None:
    """Copy the client's body to the worker as it arrives; a worker that answered early may stop reading."""
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            if body:
                writer.write(conn.send(h11.Data(data=body)))
                await writer.drain()
            if not message.get("more_body", False):
                break
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
    except (OSError, h11.LocalProtocolError):
        return  # the worker answered (e.g. 413) and closed: its answer is what the client gets


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_CHUNK))
