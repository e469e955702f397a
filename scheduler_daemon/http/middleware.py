"""``BodySizeLimit``: ASGI middleware refusing request bodies above a limit with 413 (401 without the token)."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler_daemon.http.auth import UNAUTHORIZED

#: Request bodies larger than this are refused with 413 (a config patch is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413.

    The body is read up front (it is small by definition) and replayed to the
    app, so a chunked upload without ``Content-Length`` is capped too.
    ``limit_for`` gives a request's own limit (bulk writes carry more); only
    a request that is ``authorized`` gets more than ``limit``: another one
    over ``limit`` gets 401, so a client without the token never makes the
    daemon buffer more than ``limit``.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY_BYTES,
        limit_for: Callable[[Scope], int] | None = None,
        authorized: Callable[[Scope], bool] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.limit_for = limit_for or (lambda scope: limit)
        self.authorized = authorized or (lambda scope: True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refuse = self.limit_for(scope), self._too_large
        if limit > self.limit and not self.authorized(scope):
            limit, refuse = self.limit, self._unauthorized
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await refuse(send, limit)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await refuse(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    @staticmethod
    async def _too_large(send: Send, limit: int) -> None:
        await _answer(send, 413, f"request body larger than {limit} bytes")

    @staticmethod
    async def _unauthorized(send: Send, limit: int) -> None:
        await _answer(send, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
