"""The ingest API against the real app and a real database (both backends).

Served through httpx's ASGI transport in the test's event loop; the runner is
driven by a virtual clock, so "by the next tick" is exact. Rejected requests
are checked to have written nothing by counting rows before and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from scheduler_daemon.admin import WorldAdmin
from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.http.ingest_routes import NpcList, WorldState
from scheduler_daemon.http.middleware import MAX_BODY_BYTES
from scheduler_daemon.http.routes import create_app
from scheduler_daemon.ingest import MAX_NPCS_PER_REQUEST
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.leases import LeaseStore
from scheduler_daemon.store.repository import Store
from tests.store.test_http_api import AUTH, TOKEN, Api, make_api

WORLDS = "/api/v1/worlds"
CALM = {"timeScale": 60, "tickIntervalSeconds": 1.0}


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    admin, runner, clock = make_api(store)
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        yield Api(client, runner, clock, store, admin.metrics, admin)


async def rows(store: Store) -> dict[str, list[str]]:
    """Every row the ingest API can write, as text: equal snapshots mean nothing was written."""
    out = {}
    async with store.connect() as conn:
        for table in ("worlds", "world_states", "npcs", "sessions", "interaction_cooldowns"):
            result = await conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2"))
            out[table] = [repr(tuple(r)) for r in result]
    return out


async def create(api: Api, external_id: str | None = "harbor", **fields: Any) -> dict[str, Any]:
    body = {"name": "Harbor", "simulation": CALM, **fields}
    if external_id is not None:
        body["externalId"] = external_id
    r = await api.client.post(WORLDS, json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def npc(external_id: str, **fields: Any) -> dict[str, Any]:
    return {"externalId": external_id, "name": external_id.title(), **fields}


async def tiers(api: Api, world: str) -> dict[str, str]:
    r = await api.client.get(f"{WORLDS}/{world}/npcs", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return {n["externalId"]: n["tier"] for n in r.json()["npcs"]}


# ------------------------------------------------------------------ worlds
async def test_create_is_idempotent_by_external_id_and_conflicts_on_a_different_body(api: Api) -> None:
    world = await create(api, meta={"owner": "game"})
    assert world["externalId"] == "harbor" and world["simulation"] == CALM and world["meta"] == {"owner": "game"}
    assert (world["worldTime"], world["paused"], world["configVersion"]) == (0.0, False, 1)
    same = await api.client.post(
        WORLDS, json={"externalId": "harbor", "name": "Harbor", "simulation": CALM, "meta": {"owner": "game"}}
    )
    assert same.status_code == 200 and same.json() == world
    before = await rows(api.store)
    other = await api.client.post(WORLDS, json={"externalId": "harbor", "name": "Port", "simulation": {"timeScale": 2}})
    assert other.status_code == 409
    assert "different name, simulation, meta" in other.json()["detail"]
    assert await rows(api.store) == before
    for ref in (world["id"], "ext:harbor", "ext%3Aharbor"):
        got = await api.client.get(f"{WORLDS}/{ref}")
        assert got.status_code == 200 and got.json() == world, ref
    # Without an external id every POST creates a world.
    assert (await create(api, None))["id"] != (await create(api, None))["id"]


async def test_create_refuses_bad_bodies_naming_the_fields_and_writes_nothing(api: Api) -> None:
    before = await rows(api.store)
    cases: list[tuple[Any, list[Any]]] = [
        ({"name": "W", "simulation": {"timeScale": -1}}, ["body", "simulation", "timeScale"]),
        (
            {"name": "W", "simulation": {"tiers": {"detailed": {"maxNpcs": "x"}}}},
            ["body", "simulation", "tiers", "detailed", "maxNpcs"],
        ),
        ({"name": "W", "meta": {"simulation": {}}}, ["body"]),
        ({"name": ""}, ["body", "name"]),
        ({"name": "W", "externalId": "a/b"}, ["body", "externalId"]),
        ({"name": "W", "meta": {"k": "nul\u0000"}}, ["body", "meta"]),
        ({"name": "W", "id": 5}, ["body", "id"]),
        ({}, ["body", "name"]),
    ]
    for body, loc in cases:
        r = await api.client.post(WORLDS, json=body)
        assert r.status_code == 422, (body, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], (body, r.json())
    assert await rows(api.store) == before


async def test_patch_merges_applies_before_the_next_tick_and_refuses_without_writing(api: Api) -> None:
    world = await create(api, meta={"owner": "game", "region": "north"}, simulation={**CALM, "alwaysOn": True})
    await api.runner.discover()
    await api.runner.run_until(2.0)
    r = await api.client.patch(
        f"{WORLDS}/ext:harbor",
        json={
            "name": "Port",
            "externalId": "port",
            "meta": {"region": None, "mood": "calm"},
            "simulation": {"timeScale": 120},
        },
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["name"], patched["externalId"], patched["meta"]) == (
        "Port",
        "port",
        {"owner": "game", "mood": "calm"},
    )
    assert patched["simulation"] == {**CALM, "alwaysOn": True, "timeScale": 120}
    assert patched["configVersion"] == 2
    assert api.runner.scheduler.get_context(world["id"]).config.time_scale == 120  # applied before answering
    assert (await api.client.get(f"{WORLDS}/ext:harbor")).status_code == 404
    await create(api, "taken")
    before = await rows(api.store)
    for body, status in (
        ({"simulation": {"timeScale": 0}}, 422),
        ({"name": None}, 422),
        ({"externalId": "taken"}, 409),
        ({"meta": {"simulation": {}}}, 422),
    ):
        r = await api.client.patch(f"{WORLDS}/ext:port", json=body)
        assert r.status_code == status, (body, r.text)
    assert await rows(api.store) == before
    r = await api.client.patch(f"{WORLDS}/ext:port", json={"externalId": None})
    assert r.status_code == 200 and r.json()["externalId"] is None


async def test_delete_world_stops_it_and_then_it_is_404(api: Api) -> None:
    world = await create(api, simulation={**CALM, "alwaysOn": True})
    await api.runner.discover()
    assert world["id"] in api.runner.world_ids
    r = await api.client.delete(f"{WORLDS}/ext:harbor")
    assert r.status_code == 204
    assert world["id"] not in api.runner.world_ids  # dropped before the answer
    assert (await api.client.get(f"{WORLDS}/{world['id']}")).status_code == 404
    assert (await api.client.delete(f"{WORLDS}/ext:harbor")).status_code == 404
    assert await rows(api.store) == {
        t: [] for t in ("worlds", "world_states", "npcs", "sessions", "interaction_cooldowns")
    }


async def test_delete_world_during_its_tick_waits_for_the_tick_and_logs_no_error(api: Api) -> None:
    # On PostgreSQL a delete committed during the tick deadlocked with it (503) or failed the
    # tick's fence ("tick refused", "world_resync_failed" with a traceback). Each round lets
    # the tick run a different number of loop steps before the DELETE arrives.
    for steps in range(0, 40, 2):
        world = await create(api, f"w{steps}", simulation={**CALM, "alwaysOn": True})
        npcs = [npc(f"n{i}", location="dock") for i in range(50)]
        assert (await api.client.put(f"{WORLDS}/ext:w{steps}/npcs", json=npcs)).status_code == 200
        await api.runner.discover()
        await api.runner.run_until(api.clock.now() + 1.0)
        with structlog.testing.capture_logs() as logs:
            tick = asyncio.ensure_future(api.runner.run_until(api.clock.now() + 1.0))
            for _ in range(steps):
                await asyncio.sleep(0)
            r = await api.client.delete(f"{WORLDS}/ext:w{steps}")
            await tick
        assert r.status_code == 204, (steps, r.text)
        assert [e for e in logs if e["log_level"] in ("error", "critical")] == [], steps
        assert world["id"] not in api.runner.world_ids
        await api.runner.run_until(api.clock.now() + 2.0)
    assert await rows(api.store) == {
        t: [] for t in ("worlds", "world_states", "npcs", "sessions", "interaction_cooldowns")
    }


async def test_delete_world_during_its_tick_on_another_daemon_does_not_deadlock(pg_store: Store) -> None:
    # Daemon a answers the API, daemon b owns the world (leases) and ticks it: b's fenced tick
    # locks the state row first, then NPC rows; the delete's cascade took NPC rows, then waited
    # for the state row: a deadlock, answered 503. Each round lets b's tick run a different
    # number of loop steps before the DELETE arrives.
    store = pg_store
    clock_a, clock_b = VirtualClock(), VirtualClock()
    runners = [
        SchedulerLoopRunner(
            WorldScheduler(store), store, clock=clock, leases=LeaseKeeper(LeaseStore(store.engine, name, 30.0), clock)
        )
        for name, clock in (("a", clock_a), ("b", clock_b))
    ]
    runner_a, runner_b = runners
    admin = WorldAdmin(
        store, runner_a.scheduler, runner_a, SchedulerMetrics(version="test", runner=runner_a, process_collectors=False)
    )
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        # A second world b ticks in the same batch: longer ticks, more interleavings.
        kept = (await client.post(WORLDS, json={"name": "Kept", "simulation": {**CALM, "alwaysOn": True}})).json()
        npcs = [npc(f"k{i}", location="dock") for i in range(200)]
        assert (await client.put(f"{WORLDS}/{kept['id']}/npcs", json=npcs)).status_code == 200
        for steps in range(60):
            body = {"externalId": f"w{steps}", "name": "W", "simulation": {**CALM, "alwaysOn": True}}
            world = (await client.post(WORLDS, json=body)).json()
            npcs = [npc(f"n{i}", location="dock") for i in range(50)]
            assert (await client.put(f"{WORLDS}/ext:w{steps}/npcs", json=npcs)).status_code == 200
            await runner_b.discover()
            assert runner_b.world_ids == [kept["id"], world["id"]]
            await runner_b.run_until(clock_b.now() + 1.0)
            with structlog.testing.capture_logs() as logs:
                tick = asyncio.ensure_future(runner_b.run_until(clock_b.now() + 1.0))
                for _ in range(steps):
                    await asyncio.sleep(0)
                r = await client.delete(f"{WORLDS}/ext:w{steps}")
                await tick
                await runner_b.run_until(clock_b.now() + 1.0)  # b learns it from its next tick
            assert r.status_code == 204, (steps, r.text)
            assert [e for e in logs if e["log_level"] in ("error", "critical")] == [], steps
            assert runner_b.world_ids == [kept["id"]]


async def test_bad_references_are_422_and_unknown_ones_404(api: Api) -> None:
    await create(api)
    paths = (
        ("GET", "{w}"),
        ("PATCH", "{w}"),
        ("DELETE", "{w}"),
        ("GET", "{w}/npcs"),
        ("PUT", "{w}/npcs"),
        ("DELETE", "{w}/npcs/ext:bob"),
        ("PUT", "{w}/sessions/ext:s"),
        ("DELETE", "{w}/sessions/ext:s"),
    )
    bodies = {"PATCH": {}, "PUT": []}
    for method, template in paths:
        body: Any = bodies.get(method)
        if "sessions" in template and method == "PUT":
            body = {"userId": "u"}
        for bad in ("0", "abc", "ext:", "2147483648", "-1"):
            r = await api.client.request(method, f"{WORLDS}/{template.format(w=bad)}", json=body)
            assert r.status_code == 422, (method, template, bad, r.text)
        for unknown in ("999", "ext:nowhere"):
            r = await api.client.request(method, f"{WORLDS}/{template.format(w=unknown)}", json=body)
            assert r.status_code == 404, (method, template, unknown, r.text)
            assert unknown in r.json()["detail"]
    for method, path in (
        ("DELETE", "ext:harbor/npcs/ext:bob"),
        ("DELETE", "ext:harbor/npcs/77"),
        ("DELETE", "ext:harbor/sessions/9"),
    ):
        r = await api.client.request(method, f"{WORLDS}/{path}")
        assert r.status_code == 404 and "does not exist" in r.json()["detail"], (path, r.text)


# -------------------------------------------------------------------- NPCs
async def test_npc_upsert_is_idempotent_and_pages_by_id(api: Api) -> None:
    world = await create(api)
    batch = [npc(f"n{i:02}", location="dock", state={"hunger": i}) for i in range(25)]
    first = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=batch)
    assert first.status_code == 200, first.text
    assert (first.json()["created"], first.json()["updated"]) == (25, 0)
    snapshot = await rows(api.store)
    again = await api.client.put(f"{WORLDS}/{world['id']}/npcs", json=batch)
    assert again.status_code == 200
    assert (again.json()["created"], again.json()["updated"]) == (0, 25)
    assert [n["id"] for n in again.json()["npcs"]] == [n["id"] for n in first.json()["npcs"]]
    assert await rows(api.store) == snapshot  # same PUT twice: same rows
    # A partial update by daemon id keeps the other fields; state merges at the top level.
    n0 = first.json()["npcs"][0]["id"]
    r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[{"id": n0, "name": "N00", "state": {"thirst": 1}}])
    assert r.status_code == 200 and r.json()["npcs"] == [{"id": n0, "externalId": None, "created": False}]
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 10, **({"cursor": cursor} if cursor is not None else {})}
        page = await api.client.get(f"{WORLDS}/ext:harbor/npcs", params=params)
        assert page.status_code == 200, page.text
        seen += page.json()["npcs"]
        cursor = page.json()["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == 25 and [n["id"] for n in seen] == sorted(n["id"] for n in seen)
    assert seen[0] == {
        "id": n0,
        "externalId": "n00",
        "name": "N00",
        "location": "dock",
        "home": None,
        "routine": None,
        "energy": 100.0,
        "moodValence": 0.0,
        "moodArousal": 0.0,
        "state": {"hunger": 0, "thirst": 1},
        "tier": "dormant",
        "currentActivity": None,
        "activityStartedAt": None,
        "nextDecisionAt": 0.0,
        "lastDecisionAt": None,
        "decisions": 0,
        "problem": None,
    }
    assert (await api.client.get(f"{WORLDS}/ext:harbor/npcs", params={"tier": "detailed"})).json() == {
        "npcs": [],
        "nextCursor": None,
    }
    for bad in ({"tier": "hot"}, {"limit": 0}, {"limit": 1001}, {"cursor": -1}, {"color": "red"}):
        assert (await api.client.get(f"{WORLDS}/ext:harbor/npcs", params=bad)).status_code == 422, bad


async def test_npc_upsert_refuses_bad_batches_whole(api: Api) -> None:
    await create(api)
    r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[npc("bob"), npc("ann")])
    bob = r.json()["npcs"][0]["id"]
    before = await rows(api.store)
    cases: list[tuple[Any, int, list[Any]]] = [
        ([npc("new"), {"id": 999_999, "name": "Ghost"}], 422, ["body", 1, "id"]),
        ([npc("new"), {"name": "No key"}], 422, ["body", 1]),
        ([npc("new"), {"id": bob, "externalId": "ann", "name": "Two"}], 422, ["body", 1, "id"]),
        ([npc("new"), npc("bob"), {"id": bob, "name": "Bob"}], 422, ["body", 2, "id"]),
        # One new external id twice: refused by item, not a unique violation of the database (was 503).
        ([npc("new"), npc("new")], 422, ["body", 1, "externalId"]),
        ([{"id": bob, "externalId": "new", "name": "Bob"}, npc("new")], 422, ["body", 1, "externalId"]),
        ([npc("new"), npc("x", tier="detailed")], 422, ["body", 1, "tier"]),
        ([npc("new"), npc("x", energy="high")], 422, ["body", 1, "energy"]),
        ([npc("new"), npc("x", state=[1])], 422, ["body", 1, "state"]),
        ({"externalId": "not-a-list"}, 422, ["body"]),
    ]
    for body, status, loc in cases:
        r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=body)
        assert r.status_code == status, (body, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], (body, r.json())
    too_many = [npc(f"n{i}") for i in range(MAX_NPCS_PER_REQUEST + 1)]
    r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=too_many)
    assert r.status_code == 413 and f"at most {MAX_NPCS_PER_REQUEST} per request" in r.json()["detail"]
    assert await rows(api.store) == before
    # The limit itself fits, even though its body is over the 64 KiB of other routes.
    at_limit = [npc(f"n{i:04}", state={"needs": {"food": 0.5, "sleep": 0.25}}) for i in range(MAX_NPCS_PER_REQUEST)]
    r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=at_limit)
    assert r.status_code == 200 and r.json()["created"] == MAX_NPCS_PER_REQUEST
    assert len(r.request.content) > MAX_BODY_BYTES
    r = await api.client.post(f"{WORLDS}/ext:harbor/scheduler/tick", content=b"[" + b" " * MAX_BODY_BYTES + b"]")
    assert r.status_code == 413  # other routes keep their limit


async def test_an_unauthenticated_ingest_write_is_401_before_its_body_is_read_past_64_kib(api: Api) -> None:
    await create(api)
    url = f"{WORLDS}/ext:harbor/npcs"
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:  # 2 MiB without Content-Length, counted as the daemon reads it
        nonlocal pulled
        for _ in range(64):
            pulled += 1
            yield b" " * (32 * 1024)

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        pulled = 0
        anonymous = httpx.AsyncClient(transport=api.client._transport, base_url="http://test", headers=headers)
        async with anonymous:
            r = await anonymous.put(url, content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
            assert pulled <= MAX_BODY_BYTES // (32 * 1024) + 1  # not 2 MiB buffered for a stranger
            big = b"[" + b" " * MAX_BODY_BYTES + b"]"  # declared length over 64 KiB: refused unread
            r = await anonymous.put(url, content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 401, r.text
            r = await anonymous.put(url, json=[npc("bob")])  # small: the route's own 401
            assert r.status_code == 401
    pulled = 0
    r = await api.client.put(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and pulled == 64  # with the token the whole 2 MiB is read


async def test_delete_npc_by_external_id_leaves_the_sessions(api: Api) -> None:
    await create(api)
    await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[npc("bob"), npc("ann")])
    r = await api.client.put(
        f"{WORLDS}/ext:harbor/sessions/ext:s1", json={"userId": "u", "sceneNpcIds": ["bob", "ann"]}
    )
    ann = r.json()["sceneNpcIds"][1]
    assert (await api.client.delete(f"{WORLDS}/ext:harbor/npcs/ext:bob")).status_code == 204
    assert (await api.client.delete(f"{WORLDS}/ext:harbor/npcs/ext:bob")).status_code == 404
    r = await api.client.put(f"{WORLDS}/ext:harbor/sessions/ext:s1", json={"userId": "u", "sceneNpcIds": [ann]})
    assert r.status_code == 200 and r.json()["sceneNpcIds"] == [ann]
    assert set(await tiers(api, "ext:harbor")) == {"ann"}


# ---------------------------------------------------------------- sessions
async def test_a_session_opened_through_the_api_changes_tiers_by_the_next_tick(api: Api) -> None:
    world = await create(api, simulation={**CALM, "alwaysOn": True})
    await api.client.put(
        f"{WORLDS}/ext:harbor/npcs",
        json=[npc("bob", location="dock"), npc("ann", location="market"), npc("cid", location="dock"), npc("dan")],
    )
    await api.runner.discover()
    await api.runner.run_until(1.0)
    assert set((await tiers(api, "ext:harbor")).values()) == {"dormant"}  # alwaysOn, nobody online
    r = await api.client.put(
        f"{WORLDS}/ext:harbor/sessions/ext:player-1",
        json={"userId": "player-1", "location": "dock", "sceneNpcIds": ["bob"], "involvedNpcIds": ["ann"]},
    )
    assert r.status_code == 201, r.text
    session = r.json()
    assert (session["externalId"], session["userId"], session["active"]) == ("player-1", "player-1", True)
    # Applied before the answer: the tiers are there, and the next tick decides at them.
    assert await tiers(api, "ext:harbor") == {"bob": "detailed", "cid": "detailed", "ann": "active", "dan": "ambient"}
    ticks = api.runner.scheduler.get_context(world["id"]).ticks_processed
    await api.runner.run_until(2.0)
    ctx = api.runner.scheduler.get_context(world["id"])
    assert ctx.ticks_processed == ticks + 1
    assert ctx.npcs_per_tier[Tier.DETAILED] == 2  # bob and cid, decided at their new tier
    r = await api.client.put(
        f"{WORLDS}/ext:harbor/sessions/{session['id']}", json={"userId": "player-1", "location": "market"}
    )
    assert r.status_code == 200
    assert await tiers(api, "ext:harbor") == {"bob": "ambient", "cid": "ambient", "ann": "detailed", "dan": "ambient"}
    assert (await api.client.delete(f"{WORLDS}/ext:harbor/sessions/ext:player-1")).status_code == 204
    assert (await api.client.delete(f"{WORLDS}/ext:harbor/sessions/ext:player-1")).status_code == 204  # closed already
    assert set((await tiers(api, "ext:harbor")).values()) == {"dormant"}


async def test_a_session_naming_missing_npcs_is_422_listing_them(api: Api) -> None:
    await create(api)
    await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[npc("bob")])
    before = await rows(api.store)
    r = await api.client.put(
        f"{WORLDS}/ext:harbor/sessions/ext:s1",
        json={"userId": "u", "sceneNpcIds": ["bob", "zed", 999_999], "involvedNpcIds": ["zed"]},
    )
    assert r.status_code == 422
    assert [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [
        (
            ["body", "sceneNpcIds", 1],
            f"NPC ext:zed does not exist in world {(await api.client.get(f'{WORLDS}/ext:harbor')).json()['id']}",
        ),
        (["body", "sceneNpcIds", 2], r.json()["detail"][1]["msg"]),
        (["body", "involvedNpcIds", 0], r.json()["detail"][0]["msg"]),
    ]
    assert "NPC 999999 does not exist" in r.json()["detail"][1]["msg"]
    for body in ({"userId": ""}, {"userId": "u", "sceneNpcIds": [1.5]}, {"userId": "u", "active": False}, {}):
        assert (await api.client.put(f"{WORLDS}/ext:harbor/sessions/ext:s1", json=body)).status_code == 422, body
    r = await api.client.put(f"{WORLDS}/ext:harbor/sessions/12345", json={"userId": "u"})
    assert r.status_code == 404 and "session 12345 does not exist" in r.json()["detail"]
    assert await rows(api.store) == before


async def test_percent_encoded_external_ids_and_unreadable_rows_are_listed_with_their_problem(api: Api) -> None:
    await create(api, "north gate")
    r = await api.client.put("/api/v1/worlds/ext:north%20gate/npcs", json=[npc("ölaf ø"), npc("bob")])
    assert r.status_code == 200, r.text
    olaf, bob = (n["id"] for n in r.json()["npcs"])
    async with api.store.transaction() as conn:  # a game's bad SQL write
        await conn.execute(sa.text("UPDATE npcs SET state = '[1]' WHERE id = :n"), {"n": bob})
    listed = {n["id"]: n for n in (await api.client.get("/api/v1/worlds/ext:north%20gate/npcs")).json()["npcs"]}
    assert listed[bob]["problem"] == "state: expected a JSON object, got array" and listed[bob]["state"] is None
    assert listed[olaf]["problem"] is None and listed[olaf]["externalId"] == "ölaf ø"
    assert (await api.client.delete("/api/v1/worlds/ext:north%20gate/npcs/ext:%C3%B6laf%20%C3%B8")).status_code == 204
    assert list(await tiers(api, "ext:north gate")) == ["bob"]


async def test_an_encoded_slash_never_reaches_another_route(api: Api) -> None:
    # Decoded before routing, ext:harbor%2Fnpcs%2Fext:bob was DELETE …/ext:harbor/npcs/ext:bob:
    # a game passing an id it did not check (external ids have no '/') deleted an NPC.
    await create(api)
    await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[npc("bob")])
    before = await rows(api.store)
    for method, path in (
        ("DELETE", "ext:harbor%2Fnpcs%2Fext:bob"),
        ("DELETE", "ext:harbor%2fnpcs/ext:bob"),
        ("GET", "ext:harbor%2Fnpcs"),
    ):
        r = await api.client.request(method, f"{WORLDS}/{path}")
        assert r.status_code == 422 and "'/'" in r.text, (path, r.text)
    assert await rows(api.store) == before


async def test_unreadable_npc_rows_are_answered_within_the_documented_schema(api: Api) -> None:
    await create(api)
    r = await api.client.put(f"{WORLDS}/ext:harbor/npcs", json=[npc("bob"), npc("ann")])
    bob = r.json()["npcs"][0]["id"]
    async with api.store.transaction() as conn:  # a game's bad SQL write
        await conn.execute(sa.text("UPDATE npcs SET state = '[1]', tier = 9, name = '' WHERE id = :n"), {"n": bob})
    r = await api.client.get(f"{WORLDS}/ext:harbor/npcs")
    assert r.status_code == 200
    listed = NpcList.model_validate(r.json()).npcs  # the response model the OpenAPI schema is made of
    assert listed[0].problem is not None and listed[0].state is None and listed[0].tier is None
    assert listed[1].problem is None


async def test_a_world_written_badly_with_sql_is_answered_within_the_documented_schema(api: Api) -> None:
    world = await create(api)
    async with api.store.transaction() as conn:
        await conn.execute(
            sa.text("""UPDATE worlds SET name = '', meta = '{"simulation": [1], "x": 1}' WHERE id = :w"""),
            {"w": world["id"]},
        )
    r = await api.client.get(f"{WORLDS}/ext:harbor")
    assert r.status_code == 200
    answer = WorldState.model_validate(r.json())  # the response model the OpenAPI schema is made of
    assert (answer.name, answer.simulation, answer.meta) == ("", [1], {"x": 1})


async def test_concurrent_writers_of_one_new_external_id_end_with_one_row(api: Api) -> None:
    body = {"externalId": "race", "name": "Race", "simulation": CALM}
    answers = await asyncio.gather(*(api.client.post(WORLDS, json=body) for _ in range(5)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 200, 201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    batch = [npc("bob", location="dock"), npc("ann")]
    answers = await asyncio.gather(*(api.client.put(f"{WORLDS}/ext:race/npcs", json=batch) for _ in range(5)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert sorted(r.json()["created"] for r in answers) == [0, 0, 0, 0, 2]
    assert len((await rows(api.store))["npcs"]) == 2
