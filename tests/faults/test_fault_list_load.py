"""Fault 12: the admin API's cost stays bounded and is not paid by the tick loop.

Thousands of worlds tick (most slowly, some fast); one more world carries a
``meta`` far over the size limit. For a baseline window nothing but ticking
happens; then, for a window of the same length, several clients page through
``GET /api/v1/worlds`` as fast as they get answers (as ``top`` does, at the
largest page size) while others scrape ``/metrics``. Afterwards:

* missed ticks did not rise: the load window's missed slots are at most the
  baseline's plus a small allowance;
* ``/healthz`` kept answering quickly throughout, every list page came back,
  and no page was larger than the largest page size;
* the oversized world is isolated with the reason (it was never loaded),
  and resident memory did not balloon under the parallel lists;
* the tick audit holds for the fast worlds.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.http.wire import MAX_PAGE_SIZE
from scheduler_daemon.store.base import MAX_WORLD_META_BYTES
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    poll,
    profile,
    record_result,
    running_daemon,
    seed_many_worlds,
    utcnow,
    wait_for_progress,
    write_config,
)

pytestmark = pytest.mark.subprocess

#: Slow worlds fall due after both windows: they are there to make the lists long.
SLOW = {"tickIntervalSeconds": 120.0, "maxCatchUpSeconds": 120.0, "timeScale": 60.0}
FAST = {"tickIntervalSeconds": 0.5, "maxCatchUpSeconds": 30.0, "timeScale": 60.0}
FAST_WORLDS = 20
LISTERS = 5
SCRAPERS = 2
WINDOW_SECONDS = 15.0
#: Missed slots the load window may add over the baseline (scheduling noise of a shared machine).
MISSED_ALLOWANCE = 10
#: /healthz must answer within this, every time, while the lists run.
HEALTHZ_LIMIT_SECONDS = 1.0
#: Resident memory the parallel lists may add.
RSS_GROWTH_LIMIT_MIB = 64.0


def _metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for name in ("worldsched_ticks_missed_total", "process_resident_memory_bytes"):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(found[1]) if found else 0.0
    found = re.search(r'^worldsched_ticks_total\{outcome="ok"\} (\S+)$', text, re.M)
    out["ticks_ok"] = float(found[1]) if found else 0.0
    return out


async def _load(port: int, seconds: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    stop = time.monotonic() + seconds
    pages: list[float] = []
    health: list[float] = []
    largest_page = 0
    errors: list[str] = []

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def lister() -> None:
            nonlocal largest_page
            while time.monotonic() < stop:
                cursor = None
                while time.monotonic() < stop:
                    query = f"?limit={MAX_PAGE_SIZE}" + (f"&cursor={cursor}" if cursor is not None else "")
                    started = time.monotonic()
                    answer = await client.get("/api/v1/worlds" + query)
                    pages.append(time.monotonic() - started)
                    if answer.status_code != 200:
                        errors.append(f"list: {answer.status_code}")
                        return
                    body = answer.json()
                    largest_page = max(largest_page, len(body["worlds"]))
                    cursor = body["nextCursor"]
                    if cursor is None:
                        break

        async def scraper() -> None:
            while time.monotonic() < stop:
                if (await client.get("/metrics")).status_code != 200:
                    errors.append("metrics")

        async def prober() -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                if (await client.get("/healthz")).status_code != 200:
                    errors.append("healthz")
                health.append(time.monotonic() - started)
                await asyncio.sleep(0.1)

        await asyncio.gather(*(lister() for _ in range(LISTERS)), *(scraper() for _ in range(SCRAPERS)), prober())
    return {"pages": pages, "health": health, "largest_page": largest_page, "errors": errors}


def test_list_calls_at_thousands_of_worlds_do_not_cost_ticks(fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = fault_db
    slow_count = max(profile().load_worlds // 2, 1000)
    seed_many_worlds(db, [SLOW] * slow_count, name="slow")
    fast = seed_many_worlds(db, [FAST] * FAST_WORLDS, name="fast")
    (huge,) = seed_many_worlds(db, [{}], name="huge")
    cast = "CAST(:m AS jsonb)" if db.backend == "postgres" else ":m"
    db.execute(
        f"UPDATE worlds SET meta = {cast} WHERE id = :w",
        {"w": huge, "m": json.dumps({"simulation": {"alwaysOn": True}, "lore": "x" * (MAX_WORLD_META_BYTES * 2)})},
    )
    config = write_config(
        tmp_path / "config.toml",
        scheduler={"discovery_interval_seconds": 5.0},
        http={"bind": "127.0.0.1", "port": 0},
        extra="[metrics]\nper_world = false\n",
    )
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        started = utcnow()
        port = daemon.http_port(timeout=120)
        wait_for_progress(db, fast, timeout=120, what="the fast worlds to tick")
        isolated = poll(
            lambda: [e for e in daemon.events("world_isolated") if e.get("world_id") == huge],
            timeout=30,
            what="the oversized world to be isolated",
        )
        assert "larger than the limit" in str(isolated[0]["error"])
        time.sleep(2.0)  # past the start-up burst
        before = _metrics(port)
        time.sleep(WINDOW_SECONDS)
        middle = _metrics(port)
        load = asyncio.run(_load(port, WINDOW_SECONDS))
        after = _metrics(port)
        assert daemon.alive(), daemon.log_tail()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    baseline_missed = middle["worldsched_ticks_missed_total"] - before["worldsched_ticks_missed_total"]
    load_missed = after["worldsched_ticks_missed_total"] - middle["worldsched_ticks_missed_total"]
    rss_growth = (after["process_resident_memory_bytes"] - middle["process_resident_memory_bytes"]) / 2**20
    pages, health = sorted(load["pages"]), sorted(load["health"])
    record_result(
        "list-load",
        backend=db.backend,
        worlds=slow_count + FAST_WORLDS + 1,
        baseline_missed=baseline_missed,
        load_missed=load_missed,
        baseline_ticks=middle["ticks_ok"] - before["ticks_ok"],
        load_ticks=after["ticks_ok"] - middle["ticks_ok"],
        pages=len(pages),
        page_p99_ms=round(pages[int(len(pages) * 0.99) - 1] * 1000, 1) if pages else None,
        healthz_max_ms=round(health[-1] * 1000, 1) if health else None,
        rss_growth_mib=round(rss_growth, 1),
    )
    assert load["errors"] == [], load["errors"][:10]
    assert pages, "no list page was answered"
    assert load["largest_page"] <= MAX_PAGE_SIZE
    assert load_missed <= baseline_missed + MISSED_ALLOWANCE, (baseline_missed, load_missed)
    assert health and health[-1] < HEALTHZ_LIMIT_SECONDS, f"/healthz took up to {health[-1]:.2f} s"
    assert rss_growth < RSS_GROWTH_LIMIT_MIB, f"resident memory grew {rss_growth:.0f} MiB under the lists"
    report = check_invariants(db, {w: WorldRules(60.0, 30.0) for w in fast}, restarts=[started])
    assert report.violations == [], "\n".join(report.violations)
