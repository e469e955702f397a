"""The admin API against the real app and a real database (both backends).

The app is served through httpx's ASGI transport in the test's own event loop;
the runner is driven by a virtual clock, so "before the next tick" is exact.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon import generation
from scheduler_daemon.admin import WorldAdmin
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.http.middleware import MAX_BODY_BYTES
from scheduler_daemon.http.routes import create_app
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.support.helpers import make_world, world_state

TOKEN = "test-token-Zx9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Api:
    client: httpx.AsyncClient
    runner: SchedulerLoopRunner
    clock: VirtualClock
    store: Store
    metrics: SchedulerMetrics
    admin: WorldAdmin


def make_api(store: Store) -> tuple[WorldAdmin, SchedulerLoopRunner, VirtualClock]:
    clock = VirtualClock()
    scheduler = WorldScheduler(store)
    runner = SchedulerLoopRunner(scheduler, store, clock=clock)
    metrics = SchedulerMetrics(version="test", runner=runner, process_collectors=False)
    runner.observer = metrics
    return WorldAdmin(store, scheduler, runner, metrics), runner, clock


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    admin, runner, clock = make_api(store)
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        yield Api(client, runner, clock, store, admin.metrics, admin)


async def running_world(api: Api, **simulation: Any) -> int:
    world_id, _ = await make_world(
        api.store, simulation={"timeScale": 60, **simulation}, npcs_per_tier={Tier.DETAILED: 2, Tier.AMBIENT: 3}
    )
    await api.runner.add_world(world_id)
    return world_id


# --------------------------------------------------------------------- auth
async def test_every_api_route_requires_the_token(api: Api) -> None:
    world_id = await running_world(api)
    spec = (await api.client.get("/openapi.json")).json()
    routes = [(m, p) for p, ops in spec["paths"].items() if p.startswith("/api/v1") for m in ops]
    assert len(routes) == 17
    for method, template in routes:
        path = (
            template.replace("{world_id}", str(world_id)).replace("{world}", str(world_id)).replace("{request_id}", "1")
        )
        path = path.replace("{npc}", "1").replace("{session}", "1")
        for auth in ("", "Bearer wrong", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
            r = await api.client.request(method, path, headers={"Authorization": auth})
            assert r.status_code == 401, (method, path, auth, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await api.client.request(method, path)).status_code != 401
    # The open endpoints need nothing.
    for path in ("/metrics", "/healthz", "/readyz", "/openapi.json"):
        r = await api.client.get(path, headers={"Authorization": ""})
        assert r.status_code == 200, path


async def test_without_a_configured_token_the_api_is_open(store: Store) -> None:
    admin, _, _ = make_api(store)
    app = create_app(admin, token=lambda: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/api/v1/worlds")).status_code == 200


async def test_token_is_read_per_request(store: Store) -> None:
    current = {"token": "old"}
    admin, _, _ = make_api(store)
    app = create_app(admin, token=lambda: current["token"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/api/v1/worlds", headers={"Authorization": "Bearer old"})).status_code == 200
        current["token"] = "new"  # what a SIGHUP with a rotated token file does
        assert (await c.get("/api/v1/worlds", headers={"Authorization": "Bearer old"})).status_code == 401
        assert (await c.get("/api/v1/worlds", headers={"Authorization": "Bearer new"})).status_code == 200


# ------------------------------------------------------------------- worlds
async def test_list_worlds_with_states_and_isolated_worlds(api: Api) -> None:
    running = await running_world(api)
    paused = await running_world(api, pauseSimulation=True)
    broken, _ = await make_world(api.store, simulation={"timeScale": -5})
    await api.runner.discover()  # isolates the broken one, with its error
    await api.runner.run_until(3.0)
    r = await api.client.get("/api/v1/worlds")
    assert r.status_code == 200
    worlds = {w["worldId"]: w for w in r.json()["worlds"]}
    assert set(worlds) == {running, paused, broken}
    assert worlds[running]["state"] == "running"
    assert worlds[running]["worldTime"] == pytest.approx(180.0)
    assert worlds[running]["worldTimeHuman"] == "day 1 Mon 00:03"
    assert worlds[running]["timeScale"] == 60
    assert worlds[running]["tickRate"] == pytest.approx(1.0)
    assert worlds[running]["lagP99Seconds"] == 0.0
    assert worlds[running]["ticksProcessed"] == 3
    assert worlds[running]["lastError"] is None
    assert sum(worlds[running]["decisionsPerTier"].values()) >= 0
    # The deprecated name of decisionsPerTier, kept one release with its old meaning.
    assert worlds[running]["npcsPerTier"] == worlds[running]["decisionsPerTier"]
    assert worlds[broken]["decisionsPerTier"] == worlds[broken]["npcsPerTier"] == {}
    # A count here, the map of NPC id to reason in stats: the count has its own name, the old one deprecated.
    assert worlds[running]["quarantinedNpcCount"] == worlds[running]["quarantinedNpcs"] == 0
    assert worlds[broken]["quarantinedNpcCount"] == worlds[broken]["quarantinedNpcs"] == 0
    assert worlds[paused]["state"] == "paused" and worlds[paused]["worldTime"] == 0.0
    assert worlds[broken]["state"] == "isolated" and worlds[broken]["isolated"] is True
    assert "timeScale" in worlds[broken]["lastError"]


# ------------------------------------------------------------------- config
async def test_get_config_is_effective_camel_case_with_etag(api: Api) -> None:
    world_id = await running_world(api, timeScale=30)
    r = await api.client.get(f"/api/v1/worlds/{world_id}/scheduler/config")
    assert r.status_code == 200
    body = r.json()
    assert body["timeScale"] == 30 and body["maxNpcTicksPerStep"] == 50  # stored over defaults
    assert body["tiers"]["detailed"]["decisionIntervalSeconds"] == 60
    assert r.headers["etag"] == '"1"'


async def test_unknown_world_is_404_and_bad_ids_are_422(api: Api) -> None:
    world_id = await running_world(api)
    for method, suffix, body in (
        ("GET", "config", None),
        ("PUT", "config", {"timeScale": 2}),
        ("POST", "pause", None),
        ("POST", "resume", None),
        ("POST", "tick", {"deltaSeconds": 1}),
        ("GET", "stats", None),
    ):
        r = await api.client.request(method, f"/api/v1/worlds/{world_id + 100}/scheduler/{suffix}", json=body)
        assert r.status_code == 404, (method, suffix, r.text)
        assert str(world_id + 100) in r.json()["detail"]
        for bad in ("0", "-1", "abc", str(2**31), "1e3"):
            r = await api.client.request(method, f"/api/v1/worlds/{bad}/scheduler/{suffix}", json=body)
            assert r.status_code == 422, (method, suffix, bad, r.text)


async def test_put_config_persists_bumps_version_and_applies_before_next_tick(api: Api) -> None:
    world_id = await running_world(api)
    await api.runner.run_until(2.0)
    assert (await world_state(api.store, world_id))[0] == pytest.approx(120.0)
    r = await api.client.put(f"/api/v1/worlds/{world_id}/scheduler/config", json={"timeScale": 120})
    assert r.status_code == 200, r.text
    assert r.json()["timeScale"] == 120
    assert r.headers["etag"] == '"2"'
    record = await api.store.get_world(world_id)
    assert record.config_version == 2 and record.simulation_raw["timeScale"] == 120
    # Accepted at t=2.0, exactly on a tick boundary: the next tick runs at the new speed.
    await api.runner.run_until(3.0)
    assert (await world_state(api.store, world_id))[0] == pytest.approx(240.0)
    assert api.runner.scheduler.get_context(world_id).config_version == 2
    # Several fields at once, and a nested tier patch keeps the other tier fields.
    r = await api.client.put(
        f"/api/v1/worlds/{world_id}/scheduler/config",
        json={"maxNpcTicksPerStep": 25, "tickIntervalSeconds": 2.0, "tiers": {"detailed": {"maxNpcs": 5}}},
    )
    assert r.status_code == 200
    cfg = r.json()
    assert (cfg["maxNpcTicksPerStep"], cfg["tickIntervalSeconds"]) == (25, 2.0)
    assert cfg["tiers"]["detailed"] == {"maxNpcs": 5, "decisionIntervalSeconds": 60.0, "description": "Near player"}
    assert (await api.client.get(f"/api/v1/worlds/{world_id}/scheduler/config")).json() == cfg


async def test_put_config_on_an_inactive_world_is_stored(api: Api) -> None:
    world_id, _ = await make_world(api.store, session=False)
    r = await api.client.put(f"/api/v1/worlds/{world_id}/scheduler/config", json={"alwaysOn": True})
    assert r.status_code == 200
    await api.runner.discover()
    assert world_id in api.runner.world_ids


async def test_put_config_rejects_invalid_values_naming_the_fields(api: Api) -> None:
    world_id = await running_world(api)
    url = f"/api/v1/worlds/{world_id}/scheduler/config"
    r = await api.client.put(url, json={"timeScale": 0, "tiers": {"active": {"maxNpcs": -1}}})
    assert r.status_code == 422
    locs = {tuple(e["loc"]) for e in r.json()["detail"]}
    assert ("body", "timeScale") in locs and ("body", "tiers", "active", "maxNpcs") in locs
    r = await api.client.put(url, json={"maxCatchUpSeconds": 1, "tickIntervalSeconds": 5})
    assert r.status_code == 422 and "maxCatchUpSeconds" in r.text
    for raw in (
        b"[1, 2]",
        b'"x"',
        b"{",
        b"\xff\xfe{",
        b"",
        b'{"timeScale": NaN}',
        b'{"timeScale": Infinity}',
        b'{"x": -Infinity}',
    ):
        r = await api.client.put(url, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    for body in ({"k": "a\x00b"}, {"\ud800": 1}, {"tiers": {"detailed": {"description": "\udfff"}}}):
        raw = json.dumps(body).encode()
        r = await api.client.put(url, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (body, r.text)
    deep = b'{"a":' * 500 + b"1" + b"}" * 500
    r = await api.client.put(url, content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = await api.client.put(url, content=b"[" * 40000 + b"]" * 40000, headers={"Content-Type": "application/json"})
    assert r.status_code in (413, 422)
    # Nothing was stored by any of these.
    assert (await api.store.get_world(world_id)).config_version == 1


async def test_huge_bodies_are_refused_with_413(api: Api) -> None:
    world_id = await running_world(api)
    url = f"/api/v1/worlds/{world_id}/scheduler/config"
    big = json.dumps({"note": "x" * (MAX_BODY_BYTES + 1)}).encode()
    r = await api.client.put(url, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"note": "'
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    r = await api.client.put(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert (await api.store.get_world(world_id)).config_version == 1


async def test_unknown_keys_are_kept_and_null_removes_a_key(api: Api) -> None:
    world_id = await running_world(api, timeScale=30)
    url = f"/api/v1/worlds/{world_id}/scheduler/config"
    r = await api.client.put(url, json={"futureKnob": {"a": 1}})
    assert r.status_code == 200 and r.json()["futureKnob"] == {"a": 1}
    r = await api.client.put(url, json={"timeScale": None})
    assert r.status_code == 200 and r.json()["timeScale"] == 60  # back to the default


async def test_if_match_guards_against_lost_updates(api: Api) -> None:
    world_id = await running_world(api)
    url = f"/api/v1/worlds/{world_id}/scheduler/config"
    etag = (await api.client.get(url)).headers["etag"]
    ok = await api.client.put(url, json={"timeScale": 10}, headers={"If-Match": etag})
    assert ok.status_code == 200 and ok.headers["etag"] == '"2"'
    stale = await api.client.put(url, json={"timeScale": 20}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert (await api.client.get(url)).json()["timeScale"] == 10
    assert (await api.client.put(url, json={"timeScale": 20}, headers={"If-Match": "*"})).status_code == 200
    assert (await api.client.put(url, json={"timeScale": 30}, headers={"If-Match": 'W/"3"'})).status_code == 200
    # Two writers with the same ETag at once: exactly one wins.
    etag = (await api.client.get(url)).headers["etag"]
    results = await asyncio.gather(
        api.client.put(url, json={"timeScale": 7}, headers={"If-Match": etag}),
        api.client.put(url, json={"timeScale": 8}, headers={"If-Match": etag}),
    )
    assert sorted(r.status_code for r in results) == [200, 412]


# ------------------------------------------------------------ pause/resume
async def test_pause_and_resume_are_idempotent_and_persisted(api: Api) -> None:
    world_id = await running_world(api)
    await api.runner.run_until(2.0)
    base = f"/api/v1/worlds/{world_id}/scheduler"
    first = await api.client.post(f"{base}/pause")
    assert first.status_code == 200
    assert first.json() == {"worldId": world_id, "paused": True, "worldTime": pytest.approx(120.0)}
    again = await api.client.post(f"{base}/pause")
    assert again.json()["paused"] is True
    record = await api.store.get_world(world_id)
    assert record.config_version == 2 and record.simulation_raw["pauseSimulation"] is True  # one write only
    await api.runner.run_until(10.0)
    assert api.runner.scheduler.get_context(world_id).current_world_time == pytest.approx(120.0)  # frozen
    resumed = await api.client.post(f"{base}/resume")
    assert resumed.json() == {"worldId": world_id, "paused": False, "worldTime": pytest.approx(120.0)}
    assert (await api.client.post(f"{base}/resume")).status_code == 200
    await api.runner.run_until(11.0)
    assert api.runner.scheduler.get_context(world_id).current_world_time == pytest.approx(180.0)  # no jump
    assert (await api.store.get_world(world_id)).config_version == 3


# --------------------------------------------------------------------- tick
async def test_forced_tick_advances_by_delta_and_reports_the_work(api: Api) -> None:
    world_id = await running_world(api)
    r = await api.client.post(f"/api/v1/worlds/{world_id}/scheduler/tick", json={"deltaSeconds": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["worldTimeBefore"] == 0.0 and body["worldTimeAfter"] == pytest.approx(600.0)
    assert body["deltaGameSeconds"] == pytest.approx(600.0)
    assert body["npcsSimulated"] == 5 and body["decisionsPerTier"]["detailed"] == 2
    assert body["npcsPerTier"] == body["decisionsPerTier"]  # deprecated name
    assert body["jobsEnqueued"] == 0 and body["durationMs"] >= 0
    assert await world_state(api.store, world_id) == (pytest.approx(600.0), 1)
    # The regular grid is unaffected: the next loop tick still covers its own second.
    await api.runner.run_until(1.0)
    assert (await world_state(api.store, world_id))[0] == pytest.approx(660.0)
    r = await api.client.post(f"/api/v1/worlds/{world_id}/scheduler/tick", json={"deltaSeconds": 0})
    assert r.status_code == 200 and r.json()["deltaGameSeconds"] == 0.0


async def test_forced_tick_validates_delta(api: Api) -> None:
    world_id = await running_world(api, maxCatchUpSeconds=30)
    url = f"/api/v1/worlds/{world_id}/scheduler/tick"
    for body in (
        {"deltaSeconds": 31},
        {"deltaSeconds": -1},
        {},
        {"deltaSeconds": "x"},
        {"deltaSeconds": 1, "x": 2},
        {"deltaSeconds": True},
        {"deltaSeconds": "1"},
    ):
        r = await api.client.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
    r = await api.client.post(url, content=b'{"deltaSeconds": NaN}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = await api.client.post(url, content=b'{"deltaSeconds": 1e999}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "maxCatchUpSeconds" in (await api.client.post(url, json={"deltaSeconds": 31})).text
    assert (await world_state(api.store, world_id)) == (0.0, 0)


async def test_forced_tick_waits_for_the_loop_tick_of_that_world(api: Api) -> None:
    world_id = await running_world(api)
    slot_lock = api.runner._slots[world_id].lock
    await slot_lock.acquire()  # a loop tick "in flight"
    task = asyncio.create_task(api.client.post(f"/api/v1/worlds/{world_id}/scheduler/tick", json={"deltaSeconds": 1}))
    await asyncio.sleep(0.05)
    assert not task.done()
    slot_lock.release()
    assert (await task).status_code == 200


async def test_forced_tick_on_a_failing_database_is_503_not_500(api: Api) -> None:
    from tests.support.helpers import drop_trigger, install_failing_trigger

    world_id = await running_world(api)
    await install_failing_trigger(api.store, "world_states", world_id)
    try:
        r = await api.client.post(f"/api/v1/worlds/{world_id}/scheduler/tick", json={"deltaSeconds": 1})
    finally:
        await drop_trigger(api.store, "world_states")
    assert r.status_code == 503
    assert await world_state(api.store, world_id) == (0.0, 0)
    r = await api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["detail"].startswith("ticks failing: "), r.text
    await api.client.post(f"/api/v1/worlds/{world_id}/scheduler/tick", json={"deltaSeconds": 1})
    assert (await api.client.get("/readyz")).status_code == 200


# -------------------------------------------------------------------- stats
async def test_stats_are_the_context_stats_in_camel_case(api: Api) -> None:
    world_id = await running_world(api)
    await api.runner.run_until(2.0)
    r = await api.client.get(f"/api/v1/worlds/{world_id}/scheduler/stats")
    assert r.status_code == 200
    stats = r.json()
    expected = api.runner.scheduler.get_context(world_id).get_stats()
    assert stats["worldId"] == world_id
    assert stats["currentWorldTime"] == expected["current_world_time"] == pytest.approx(120.0)
    assert stats["ticksProcessed"] == 2
    assert stats["tierPopulation"] == expected["tier_population"]
    # Decisions in the last tick; npcsPerTier is their deprecated name (never the population).
    assert stats["decisionsPerTier"] == stats["npcsPerTier"] == expected["decisions_per_tier"]
    assert sum(stats["decisionsPerTier"].values()) == expected["npcs_simulated_last_tick"]
    assert stats["config"]["timeScale"] == 60
    assert len(stats) == len(expected)


# --------------------------------------------------------------- generation
async def test_generation_complete_without_a_job_queue_is_404(api: Api) -> None:
    r = await api.client.post("/api/v1/generation/5/complete", json={"status": "succeeded"})
    assert r.status_code == 404
    for body in ({"status": "done"}, {}, {"status": "failed", "error": 5}):
        assert (await api.client.post("/api/v1/generation/5/complete", json=body)).status_code == 422
    assert (await api.client.post("/api/v1/generation/0/complete", json={"status": "failed"})).status_code == 422


async def test_generation_complete_against_the_real_job_queue(api: Api) -> None:
    world_id = await running_world(api)
    (session,) = (await api.store.active_session_views()).views[world_id]
    request_id = await generation.create_request(api.store, world_id, session.id, "portrait", {"prompt": "a fox"})
    api.admin.complete_generation = functools.partial(generation.complete_for_api, api.store)
    url = f"/api/v1/generation/{request_id}/complete"
    # Still pending (never handed out): the queue refuses the transition.
    assert (await api.client.post(url, json={"status": "succeeded"})).status_code == 409
    await api.runner.scheduler.tick_world(world_id, 1.0)  # claims it; the default sink leaves it enqueued
    assert (await generation.get_request(api.store, request_id)).status == "enqueued"
    r = await api.client.post(url, json={"status": "failed", "error": "out of memory"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed" and r.json()["lastError"] == "out of memory"
    stored = await generation.get_request(api.store, request_id)
    assert (stored.status, stored.last_error) == ("failed", "out of memory")
    assert (await api.client.post(url, json={"status": "succeeded"})).status_code == 409  # already finished
    assert (await api.client.post("/api/v1/generation/999999/complete", json={"status": "failed"})).status_code == 404


async def test_generation_complete_delegates_to_the_job_queue(api: Api) -> None:
    done: dict[int, str] = {}

    async def complete(request_id: int, status: str, error: str | None) -> Mapping[str, Any]:
        if request_id == 404:
            raise LookupError(f"generation request {request_id} does not exist")
        if request_id in done:
            raise ValueError(f"generation request {request_id} is already {done[request_id]}")
        done[request_id] = status
        return {"request_id": request_id, "status": status}

    api.admin.complete_generation = complete
    r = await api.client.post("/api/v1/generation/7/complete", json={"status": "failed", "error": "oom"})
    assert r.status_code == 200 and r.json() == {"requestId": 7, "status": "failed"}
    assert (await api.client.post("/api/v1/generation/7/complete", json={"status": "failed"})).status_code == 409
    assert (await api.client.post("/api/v1/generation/404/complete", json={"status": "failed"})).status_code == 404


# ------------------------------------------------------------------ health
async def test_healthz_and_readyz(api: Api) -> None:
    assert (await api.client.get("/healthz")).json()["status"] == "ok"
    r = await api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    api.admin.accepting = lambda: False
    r = await api.client.get("/readyz")
    assert r.status_code == 503 and "stopping" in r.json()["detail"]


async def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    # A real failure: SQLite cannot open a file in a directory that does not exist.
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'db.sqlite'}")
    try:
        admin, _, _ = make_api(store)
        app = create_app(admin, token=lambda: TOKEN)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["database"] == "unreachable"
            assert (await c.get("/healthz")).status_code == 200
            families = {f.name: f for f in text_string_to_metric_families((await c.get("/metrics")).text)}
            assert families["worldsched_db_errors"].samples[0].value == 1
    finally:
        await store.dispose()


async def test_readyz_is_503_while_ticks_fail_in_the_database_and_200_after_the_next_commit(api: Api) -> None:
    from tests.support.helpers import drop_trigger, install_failing_trigger

    failing = await running_world(api)
    # Ticks on a frozen clock without a transaction: they say nothing about commits.
    await running_world(api, pauseSimulation=True)
    await install_failing_trigger(api.store, "world_states", failing)
    try:
        await api.runner.run_until(4.0)  # the first tick fails at 1 s, its retries (backed off) too
        assert api.runner.ticks_failed >= 2
        r = await api.client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["database"] == "ok"  # SELECT 1 (and PostgreSQL's read-only check) still pass
        assert re.fullmatch(r"ticks failing: \w+ since 3 s \(no commit yet\)", r.json()["detail"]), r.json()
        families = {f.name: f for f in text_string_to_metric_families((await api.client.get("/metrics")).text)}
        assert families["worldsched_db_errors"].samples[0].value == api.runner.ticks_failed
    finally:
        await drop_trigger(api.store, "world_states")
    await api.runner.run_until(8.0)  # the next retry commits
    r = await api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["detail"] is None


async def test_readyz_forgets_failed_ticks_once_no_world_is_left(api: Api) -> None:
    from tests.support.helpers import drop_trigger, install_failing_trigger

    world_id = await running_world(api)
    await install_failing_trigger(api.store, "world_states", world_id)
    try:
        await api.runner.run_until(1.0)
        assert (await api.client.get("/readyz")).status_code == 503
        await api.runner.remove_world(world_id)  # e.g. deactivated, or its lease went to another daemon
        r = await api.client.get("/readyz")
        assert r.status_code == 200, r.text
    finally:
        await drop_trigger(api.store, "world_states")


async def test_openapi_documents_every_route_in_camel_case(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in (
        "/api/v1/worlds",
        "/api/v1/worlds/{world_id}/scheduler/config",
        "/api/v1/worlds/{world_id}/scheduler/pause",
        "/api/v1/worlds/{world_id}/scheduler/resume",
        "/api/v1/worlds/{world_id}/scheduler/tick",
        "/api/v1/worlds/{world_id}/scheduler/stats",
        "/api/v1/generation/{request_id}/complete",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert set(paths["/api/v1/worlds/{world_id}/scheduler/config"]) == {"get", "put"}
    schemas = spec["components"]["schemas"]
    assert "deltaSeconds" in schemas["TickRequest"]["properties"]
    assert "timeScale" in schemas["WorldConfig"]["properties"]
    # One meaning per name: decisions per tier, population per tier; the old name marked deprecated.
    for model in ("WorldSummary", "TickResponse", "WorldStats"):
        properties = schemas[model]["properties"]
        assert "decisionsPerTier" in properties, model
        assert properties["npcsPerTier"]["deprecated"] is True, model
        assert "decisionsPerTier" in properties["npcsPerTier"]["description"], model
        assert "deprecated" not in properties["decisionsPerTier"], model
    assert "deprecated" not in schemas["WorldStats"]["properties"]["tierPopulation"]
    summary = schemas["WorldSummary"]["properties"]
    assert summary["quarantinedNpcs"]["deprecated"] is True
    assert "quarantinedNpcCount" in summary["quarantinedNpcs"]["description"]
    assert "deprecated" not in summary["quarantinedNpcCount"]


async def test_database_outage_is_503_not_500(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'db.sqlite'}")
    threads_before = set(threading.enumerate())
    try:
        admin, _, _ = make_api(store)
        transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
            # The list comes from the daemon's memory: without worlds it needs no database.
            assert (await c.get("/api/v1/worlds")).json() == {"worlds": [], "nextCursor": None, "total": 0}
            for method, path, body in (
                ("GET", "/api/v1/worlds/1/scheduler/config", None),
                ("PUT", "/api/v1/worlds/1/scheduler/config", {"timeScale": 2}),
                ("POST", "/api/v1/worlds/1/scheduler/pause", None),
            ):
                r = await c.request(method, path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert "database unavailable" in r.json()["detail"]
    finally:
        await store.dispose()
        # aiosqlite stops the thread of a connection that failed to open without
        # waiting for it: its last answer must reach this loop before the test's
        # loop closes, or the thread raises into whichever test runs next.
        deadline = time.monotonic() + 10
        while any("_connection_worker_thread" in t.name for t in set(threading.enumerate()) - threads_before):
            assert time.monotonic() < deadline, "aiosqlite worker threads still running"
            await asyncio.sleep(0.01)


async def test_the_world_list_survives_worlds_leaving_while_it_is_built(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worlds come and go while a page is built (a lease lost, an isolated world
    # dropped): the list answers with what is still here instead of failing.
    kept, gone = await running_world(api), await running_world(api)
    broken, _ = await make_world(api.store, simulation={"timeScale": -5})
    await api.runner.discover()
    assert broken in api.runner.broken
    world_names = api.store.world_names

    async def names_while_worlds_leave(ids: list[int]) -> dict[int, str]:
        names = await world_names(ids)
        await api.runner.remove_world(gone)
        api.runner.broken.pop(broken)
        return names

    monkeypatch.setattr(api.store, "world_names", names_while_worlds_leave)
    r = await api.client.get("/api/v1/worlds")
    assert r.status_code == 200, r.text
    assert [w["worldId"] for w in r.json()["worlds"]] == [kept]


async def test_the_world_list_pages_by_id_and_refuses_unknown_parameters(api: Api) -> None:
    ids = [await running_world(api) for _ in range(5)]
    broken, _ = await make_world(api.store, simulation={"timeScale": -5})
    await api.runner.discover()
    seen: list[int] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor is not None else "")
        body = (await api.client.get("/api/v1/worlds" + query)).json()
        assert len(body["worlds"]) <= 2 and body["total"] == 6
        seen += [w["worldId"] for w in body["worlds"]]
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert seen == sorted([*ids, broken])
    for bad in ("?limit=0", "?limit=1001", "?cursor=-1", "?colour=blue"):
        assert (await api.client.get("/api/v1/worlds" + bad)).status_code == 422, bad


async def test_a_scrape_is_collected_on_the_loop_and_rendered_off_it(api: Api) -> None:
    """Rendering (escaping, gzip) is a scrape's bulk: it must not hold the loop that ticks the worlds."""
    import threading

    from prometheus_client.core import GaugeMetricFamily

    loop_thread = threading.current_thread()
    seen: dict[str, set[threading.Thread]] = {"collect": set(), "samples": set()}

    class Watched(GaugeMetricFamily):
        @property  # type: ignore[override]
        def samples(self) -> list[Any]:
            seen["samples"].add(threading.current_thread())
            return self._samples  # type: ignore[no-any-return]

        @samples.setter
        def samples(self, value: list[Any]) -> None:
            self._samples = value

    class Probe:
        def collect(self) -> list[Watched]:
            seen["collect"].add(threading.current_thread())
            return [Watched("probe_value", "a probe", value=1.0)]

    api.metrics.registry.register(Probe())  # type: ignore[arg-type]
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        seen["collect"].clear(), seen["samples"].clear()
        r = await api.client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"})
        assert r.status_code == 200 and "probe_value" in r.text
        assert seen["collect"] == {loop_thread}
        # The encoder reads every sample: some thread other than the loop's did.
        assert seen["samples"] - {loop_thread}
