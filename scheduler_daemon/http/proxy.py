"""The supervisor's HTTP port (``run --workers``): one port in front of the workers' admin sockets.

* A request naming a world (``/api/v1/worlds/{id or ext:…}/…``) goes to the
  worker holding that world's lease (``world_states.lease_owner``, read per
  request), so pause, force tick and config writes keep their owner semantics;
  a world no live worker owns, and every other request, goes to the live
  workers in turn. Requests are streamed through unchanged (:mod:`.forward`).
  ``GET /api/v1/worlds`` is every worker's page merged by id.
* ``/metrics`` is one exposition: every worker's, each sample labelled
  ``worker`` (:mod:`scheduler_daemon.metrics_merge`), plus the supervisor's
  own series and process figures (``worker="supervisor"``), in the format and
  encoding the request asks for as a single daemon answers it.
* ``/healthz`` is ok while at least one worker answers its own; ``/readyz``
  only when every configured worker is up and ready (the same condition as
  the supervisor's ``READY=1``): a missing worker's worlds stand still until
  their leases expire, which is what readiness must show.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import h11
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from scheduler_daemon.entities import parse_ref
from scheduler_daemon.http.forward import UpstreamUnavailable, forward
from scheduler_daemon.http.wire import PageQuery
from scheduler_daemon.logs import get_logger
from scheduler_daemon.metrics_exposition import OPENMETRICS, Exposition, encoded, negotiate
from scheduler_daemon.metrics_merge import EOF, merge_expositions

log = get_logger("scheduler_daemon.http")

#: Merged from every worker's page (each lists its own worlds).
WORLD_LIST = "/api/v1/worlds"
#: The port's own answers wait for the workers this share of the request deadline at most: the port's
#: guard cuts a request at the deadline, and one hung worker must not silence the others' answers.
FANOUT_SHARE = 0.5


@dataclass(frozen=True)
class WorkerEndpoint:
    """A worker as the port sees it: its name (the ``worker`` label), lease-owner id and admin socket."""

    name: str
    owner: str
    socket_path: str


class Workers(Protocol):
    """What the port needs from the supervisor."""

    def serving(self) -> Sequence[WorkerEndpoint]:
        """Workers running and ready, by index."""

    def unavailable(self) -> dict[str, str]:
        """Configured workers not serving, with why (``restarting``, ``starting``)."""

    def own_metrics(self) -> tuple[Collector, Collector]:
        """The supervisor's series (carrying their labels already) and its process figures (to be labelled)."""


OwnerLookup = Callable[[int | str], Awaitable[str | None]]


def world_ref(path: str) -> int | str | None:
    """The world a request path names (``/api/v1/worlds/{ref}/…``), if any and valid."""
    parts = path.split("/")
    if len(parts) < 5 or parts[1:4] != ["api", "v1", "worlds"] or not parts[4]:
        return None
    try:
        return parse_ref(parts[4])
    except ValueError:
        return None  # any worker answers the 422


class WorkerProxy:
    """ASGI app of the supervisor's port."""

    def __init__(self, workers: Workers, owner_of: OwnerLookup, *, timeout: float) -> None:
        self.workers = workers
        self.owner_of = owner_of
        self.timeout = timeout
        self._turn = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            await self._metrics(scope, send)
            return
        own = {"/healthz": self.healthz, "/readyz": self.readyz}.get(scope["path"])
        if scope["method"] == "GET" and own is not None:
            status, content_type, body = await own()
            await _answer(send, status, body, content_type)
            return
        if scope["method"] == "GET" and scope["path"] == WORLD_LIST and self.workers.serving():
            await self._world_list(scope, send)
            return
        worker = await self._pick(scope["path"])
        if worker is None:
            await _json(send, 503, {"detail": "no worker is running; retry shortly"})
            return
        try:
            await forward(worker.socket_path, scope, receive, send, wait_seconds=self.timeout)
        except UpstreamUnavailable as exc:
            log.warning("proxy_worker_unanswered", worker=worker.name, error=str(exc))
            await _json(send, 503, {"detail": f"worker {worker.name} did not answer; retry shortly"})

    async def _pick(self, path: str) -> WorkerEndpoint | None:
        serving = self.workers.serving()
        if not serving:
            return None
        ref = world_ref(path)
        if ref is not None:
            try:
                owner = await asyncio.wait_for(self.owner_of(ref), self.timeout)
            except Exception as exc:  # the database: the request still goes somewhere, non-owners refuse or write
                log.warning("proxy_owner_lookup_failed", error=f"{type(exc).__name__}")
                owner = None
            for worker in serving:
                if worker.owner == owner:
                    return worker
        return serving[next(self._turn) % len(serving)]

    async def _world_list(self, scope: Scope, send: Send) -> None:
        """Every worker's page of worlds merged into one page by id (``top`` sees the whole box).

        Each worker checks the token and the query; the first refusal is the answer.
        """
        answers = await self._gather(WORLD_LIST, scope.get("query_string", b""), scope.get("headers", []))
        refused = next((a for _, a in answers if a.status != 200), None)
        if refused is not None:
            # Its headers too: a 401 names its scheme (WWW-Authenticate).
            extra = [(k, v) for k, v in refused.headers if k not in (b"content-type", b"content-length")]
            await _answer(send, refused.status, refused.body, refused.content_type, extra)
            return
        pages = [json.loads(a.body) for _, a in answers]
        limit = _page_limit(scope.get("query_string", b""))
        rows: dict[int, Any] = {}
        for page in pages:
            for row in page["worlds"]:
                rows.setdefault(row["worldId"], row)  # a world changing hands may be in two pages
        merged = [rows[w] for w in sorted(rows)]
        more = len(merged) > limit or any(page["nextCursor"] is not None for page in pages)
        merged = merged[:limit]
        body = {
            "worlds": merged,
            "nextCursor": merged[-1]["worldId"] if more and merged else None,
            "total": sum(int(page["total"]) for page in pages),
        }
        await _json(send, 200, body)

    # ----------------------------------------------------- answered here
    async def _gather(
        self, path: str, query: bytes = b"", headers: Sequence[Any] = ()
    ) -> list[tuple[WorkerEndpoint, Fetched]]:
        serving = list(self.workers.serving())
        answers = await asyncio.gather(
            *(
                fetch(w.socket_path, path, wait_seconds=self.timeout * FANOUT_SHARE, query=query, headers=headers)
                for w in serving
            )
        )
        return list(zip(serving, answers, strict=True))

    async def _metrics(self, scope: Scope, send: Send) -> None:
        """``/metrics``: every serving worker's exposition and the supervisor's, as one, as the request asks."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        accept = headers.get("accept", "")
        # The workers negotiate as the port does: each answers in the format of the merge.
        answers = await self._gather("/metrics", headers=[(b"accept", accept.encode("latin-1"))])
        # Merging and compressing take time in proportion to the series (per-world ones: to the worlds);
        # a thread keeps the port's loop forwarding meanwhile.
        exposition = await asyncio.to_thread(
            merged_exposition,
            [(w.name, a) for w, a in answers if a.status == 200],
            self.workers.own_metrics(),
            accept,
            headers.get("accept-encoding", ""),
        )
        extra = [(k.lower().encode(), v.encode()) for k, v in exposition.headers().items() if k != "Content-Type"]
        await _answer(send, 200, exposition.body, exposition.content_type.encode(), extra)

    async def healthz(self) -> tuple[int, bytes, bytes]:
        """``/healthz``: ok while at least one worker answers its own."""
        answers = await self._gather("/healthz")
        alive = [_health(a.body) for _, a in answers if a.status == 200]
        missing = self.workers.unavailable()
        detail = _detail(len(alive), len(answers) + len(missing), missing, [])
        return _health_answer(bool(alive), alive, "not checked", detail)

    async def readyz(self) -> tuple[int, bytes, bytes]:
        """``/readyz``: ok only when every configured worker serves and is ready."""
        answers = await self._gather("/readyz")
        problems = [
            f"worker {w.name}: {_health(a.body).get('detail') or f'HTTP {a.status}'}"
            for w, a in answers
            if a.status != 200
        ]
        healths = [_health(a.body) for _, a in answers]
        missing = self.workers.unavailable()
        databases = [h.get("database") for h in healths]
        database = next((d for d in ("unreachable", "read-only") if d in databases), "ok" if healths else "not checked")
        ok = not problems and not missing and bool(answers)
        detail = _detail(len(answers), len(answers) + len(missing), missing, problems)
        return _health_answer(ok, healths, database, detail)


@dataclass(frozen=True)
class Fetched:
    """A worker's whole answer to a GET."""

    status: int
    content_type: bytes
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


async def fetch(
    socket_path: str, path: str, *, wait_seconds: float, query: bytes = b"", headers: Sequence[Any] = ()
) -> Fetched:
    """GET ``path`` from a worker, whole; status 503 and no body when it does not answer."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        # Sent without the client's body: a length or chunked framing of it would have the worker wait for it.
        "headers": [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    try:
        await forward(socket_path, scope, receive, send, wait_seconds=wait_seconds)
    except (UpstreamUnavailable, OSError, TimeoutError, h11.RemoteProtocolError):  # the last: cut inside the body
        return Fetched(503, b"application/json", b"")
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return Fetched(503, b"application/json", b"")
    content_type = next((v for k, v in start.get("headers", []) if k == b"content-type"), b"application/json")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Fetched(start["status"], content_type, body, tuple(start.get("headers", [])))


def merged_exposition(
    answers: Sequence[tuple[str, Fetched]], own: tuple[Collector, Collector], accept: str, accept_encoding: str
) -> Exposition:
    """The workers' answers and the supervisor's ``(labelled, process)`` series as one exposition."""
    encoder, content_type = negotiate(accept)
    openmetrics = content_type.startswith(OPENMETRICS)
    parts: list[tuple[str | None, str]] = []
    for worker, answer in answers:
        try:
            parts.append((worker, _worker_exposition(answer, content_type, openmetrics)))
        except ValueError as exc:  # left out, not the whole scrape: the other workers' series still count
            log.warning("worker_metrics_unreadable", worker=worker, error=str(exc))
    labelled, process = own
    parts += [(None, encoder(labelled).decode()), ("supervisor", encoder(process).decode())]
    return encoded(merge_expositions(parts, openmetrics=openmetrics), content_type, accept_encoding)


def _worker_exposition(answer: Fetched, content_type: str, openmetrics: bool) -> str:
    """A worker's ``/metrics`` answer as text of ``content_type``; ``ValueError`` says why it is not."""
    if answer.content_type.decode("latin-1") != content_type:
        raise ValueError(f"answered {answer.content_type.decode('latin-1')!r}, not {content_type!r}")
    text = answer.body.decode("utf-8")
    if not text.endswith(f"{EOF}\n" if openmetrics else "\n") and (openmetrics or text):
        raise ValueError("cut short: no # EOF line at the end" if openmetrics else "cut short inside a line")
    return text


def _page_limit(query: bytes) -> int:
    """``limit`` of a world-list query the workers accepted, read as they read it (``3.0`` is 3)."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("limit")
    return PageQuery.model_validate({"limit": values[-1]} if values else {}).limit


def _health(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _detail(answering: int, configured: int, missing: dict[str, str], problems: list[str]) -> str:
    parts = [f"{answering} of {configured} workers answering"]
    parts.extend(f"worker {name}: {why}" for name, why in sorted(missing.items()))
    parts.extend(problems)
    return "; ".join(parts)


def _health_answer(ok: bool, healths: list[dict[str, Any]], database: str, detail: str) -> tuple[int, bytes, bytes]:
    lag = max((float(h.get("loopLagSeconds") or 0.0) for h in healths), default=0.0)
    body = {"status": "ok" if ok else "unavailable", "loopLagSeconds": lag, "database": database, "detail": detail}
    return (200 if ok else 503), b"application/json", json.dumps(body).encode()


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    await _answer(send, status, json.dumps(body).encode(), b"application/json")


async def _answer(
    send: Send, status: int, body: bytes, content_type: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
