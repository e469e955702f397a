"""Which request bodies the API reads as JSON: ``JsonBodyRoute`` and ``refuse_other_bodies``.

Every request body of the API is JSON. A body sent without a Content-Type is
read as JSON. So is a body sent as ``application/x-www-form-urlencoded`` that
parses as JSON: that is what ``curl -d '{…}'`` sends without ``-H``, as the
original deployment guide's calls do. Any other declared type (``text/plain``,
``multipart/…``, a form body that is not JSON) is answered 415 with a detail
saying to send ``Content-Type: application/json``, after the token check (a
dependency of the router, so a client without the token learns nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

FORM = "application/x-www-form-urlencoded"
#: What a route with a JSON body answers for another type (documented on each such route).
UNSUPPORTED: dict[str, Any] = {
    "description": "The body's Content-Type is not JSON: send Content-Type: application/json "
    "(a body without one, or a JSON body sent as application/x-www-form-urlencoded, is read as JSON)",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
        }
    },
}
_JSON_HEADER = (b"content-type", b"application/json")
_REFUSAL = "body_refusal"  # request.state key of a body to refuse


def is_json_type(mime: str) -> bool:
    """``application/json`` or ``application/<anything>+json`` (``mime`` without parameters, lower case)."""
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def _parses_as_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except RecursionError:
        return True  # JSON nested too deeply: the route answers it as such (422)
    except ValueError:
        return False
    return True


def body_refusal(content_type: str | None, body: bytes) -> str | None:
    """Why a request body cannot be read as JSON (``None``: read it as JSON). Pure."""
    if content_type is None or not body:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if is_json_type(mime) or (mime == FORM and _parses_as_json(body)):
        return None
    what = "with a body that is not JSON" if mime == FORM else "is not accepted"
    return f"Content-Type {mime} {what}: send the body as JSON with Content-Type: application/json"


class JsonBodyRoute(APIRoute):
    """A route whose JSON body is read whatever Content-Type the client forgot or curl chose.

    For a route that takes a body: a missing Content-Type, or curl's form type
    on a body that parses as JSON, becomes ``application/json`` before the
    body is read; any other type is marked to be refused with 415 by
    :func:`refuse_other_bodies`. Such routes document the 415 in OpenAPI.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if self.body_field is not None:
            self.responses = {**self.responses, 415: UNSUPPORTED}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def read_as_json(request: Request) -> Response:
            headers = request.scope["headers"]
            declared = next((v.decode("latin-1") for k, v in headers if k == b"content-type"), None)
            try:
                body = await request.body()
            except Exception:
                body = b""  # the client went away: FastAPI's own read fails and answers it
            if body:
                refusal = body_refusal(declared, body)
                if refusal is not None:
                    setattr(request.state, _REFUSAL, refusal)
                elif declared is None or not is_json_type(declared.split(";", 1)[0].strip().lower()):
                    request.scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [_JSON_HEADER]
            return await handler(request)

        return read_as_json


async def refuse_other_bodies(request: Request) -> None:
    """Router dependency: 415 for a body :class:`JsonBodyRoute` cannot read as JSON."""
    refusal = getattr(request.state, _REFUSAL, None)
    if refusal is not None:
        raise HTTPException(status_code=415, detail=refusal)
