"""``BodySizeLimit``: ASGI middleware refusing request bodies above a limit with 413."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Request bodies larger than this are refused with 413 (a config patch is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413.

    The body is read up front (it is small by definition) and replayed to the
    app, so a chunked upload without ``Content-Length`` is capped too.
    ``limit_for`` gives a request's own limit (bulk writes carry more).
    """

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, limit_for: Callable[[Scope], int] | None = None
    ) -> None:
        self.app = app
        self.limit_for = limit_for or (lambda scope: limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(send, limit)
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
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
