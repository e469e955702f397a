"""``scheduler-daemon top``: a live table of worlds from a running daemon's admin API.

Plain HTTP with the standard library (the daemon has no HTTP client
dependency); refreshes in place on a terminal, prints one frame per refresh
otherwise.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

TIERS = ("detailed", "active", "ambient", "dormant")
HEADER = (
    "ID",
    "NAME",
    "STATE",
    "WORLD TIME",
    "SCALE",
    "TICK/S",
    "P99 LAG",
    "NPCS/TICK d/a/am/do",
    "DECIDED",
    "JOBS",
    "OWNER",
    "ERROR",
)


class TopError(Exception):
    """The daemon could not be queried; the message says why in one line."""


#: Worlds per request: the admin API's largest page.
PAGE_SIZE = 1000


def fetch_worlds(url: str, token: str | None, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """``GET {url}/api/v1/worlds``, page by page, and return every world."""
    if not url.startswith(("http://", "https://")):
        raise TopError(f"--url must start with http:// or https://, got {url!r}")
    worlds: list[dict[str, Any]] = []
    cursor: int | None = None
    while True:
        query = f"?limit={PAGE_SIZE}" + (f"&cursor={cursor}" if cursor is not None else "")
        body = _get(url, "/api/v1/worlds" + query, token, timeout)
        page = body.get("worlds") if isinstance(body, dict) else None
        if not isinstance(page, list):
            raise TopError(f"{url}: unexpected answer (is this a scheduler-daemon?)")
        worlds += page
        cursor = body.get("nextCursor")
        if not isinstance(cursor, int):
            return worlds


def _get(url: str, path: str, token: str | None, timeout: float) -> Any:
    request = urllib.request.Request(  # noqa: S310 (scheme checked by the caller)
        url.rstrip("/") + path, headers={"Accept": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (operator-given URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise TopError(f"{url}: 401 unauthorized (pass --token-file with the admin token)") from None
        raise TopError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise TopError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise TopError(f"{url}: {exc}") from None


def _world_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    day, rest = divmod(max(seconds, 0.0), 86400.0)
    return f"day {int(day) + 1} {int(rest // 3600):02d}:{int(rest % 3600 // 60):02d}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _lag(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def rows(worlds: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Table rows, one per world."""
    out: list[tuple[str, ...]] = []
    for w in worlds:
        # npcsPerTier: the same field from a daemon older than decisionsPerTier.
        per_tier = w.get("decisionsPerTier", w.get("npcsPerTier")) or {}
        error = (w.get("lastError") or "").splitlines()[0] if w.get("lastError") else ""
        out.append(
            (
                str(w.get("worldId")),
                str(w.get("name") or ""),
                str(w.get("state")),
                _world_time(w.get("worldTime")),
                _num(w.get("timeScale"), "g"),
                _num(w.get("tickRate"), ".2f"),
                _lag(w.get("lagP99Seconds")),
                "/".join(str(per_tier.get(t, 0)) for t in TIERS) if per_tier else "-",
                _num(w.get("npcsSimulatedTotal"), "d"),
                _num(w.get("jobsEnqueuedLastTick"), "d"),
                str(w.get("leaseOwner") or "-"),
                error[:60],
            )
        )
    return out


def render(worlds: Sequence[dict[str, Any]], url: str) -> str:
    """One frame: a title line and the table."""
    table: list[tuple[str, ...]] = [HEADER, *rows(worlds)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    states: dict[str, int] = {}
    for w in worlds:
        states[str(w.get("state"))] = states.get(str(w.get("state")), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no worlds"
    title = f"scheduler-daemon {url}  {datetime.now(UTC):%H:%M:%S} UTC  {summary}"
    lines = [title, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines) + "\n"


def run_top(url: str, token: str | None, *, interval: float, once: bool, out: TextIO | None = None) -> int:
    """Show the table; refresh every ``interval`` seconds until Ctrl-C (or once)."""
    out = out or sys.stdout
    tty = out.isatty()
    try:
        while True:
            frame = render(fetch_worlds(url, token), url)
            if once:
                out.write(frame)
                return 0
            # Home + clear to end: redraw in place without scrolling.
            out.write(("\x1b[H\x1b[J" if tty else "\n") + frame)
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
