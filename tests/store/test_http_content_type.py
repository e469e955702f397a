"""Which request bodies the admin API reads as JSON (both backends, the real app in process).

The original deployment guide's tuning call is ``curl -X PUT … -d '{…}'``
without ``-H``: curl then sends ``Content-Type: application/x-www-form-urlencoded``.
A body without a Content-Type, or with curl's default type when it parses as
JSON, is read as JSON; any other declared type is 415, saying what to send.
"""

from __future__ import annotations

import json

import pytest

from scheduler_daemon.store.models import generation_requests
from tests.store.test_http_api import Api, running_world
from tests.store.test_http_api import api as api  # the fixture
from tests.support.helpers import world_state

GUIDE_BODY = b'{"maxNpcTicksPerStep": 25, "tickIntervalSeconds": 2.0}'
FORM = "application/x-www-form-urlencoded"


def config_url(world_id: int) -> str:
    return f"/api/v1/worlds/{world_id}/scheduler/config"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        FORM,
        f"{FORM}; charset=UTF-8",
        "application/json",
        "application/json; charset=utf-8",
        "application/merge-patch+json",
    ],
)
async def test_a_json_body_without_a_json_content_type_is_read_as_json(api: Api, content_type: str | None) -> None:
    world_id = await running_world(api)
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.client.put(config_url(world_id), content=GUIDE_BODY, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["maxNpcTicksPerStep"] == 25 and r.json()["tickIntervalSeconds"] == 2.0
    assert api.runner.scheduler.get_context(world_id).config.max_npc_ticks_per_step == 25


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", GUIDE_BODY),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n'),
        (FORM, b"maxNpcTicksPerStep=25&tickIntervalSeconds=2.0"),  # a real form: not JSON
        ("application/xml", b"<config/>"),
    ],
)
async def test_another_declared_type_is_415_saying_what_to_send(api: Api, content_type: str, body: bytes) -> None:
    world_id = await running_world(api)
    version = (await api.store.get_world(world_id)).config_version
    r = await api.client.put(config_url(world_id), content=body, headers={"Content-Type": content_type})
    assert r.status_code == 415, r.text
    detail = r.json()["detail"]
    assert content_type.split(";")[0] in detail and "Content-Type: application/json" in detail
    assert (await api.store.get_world(world_id)).config_version == version  # nothing written


async def test_every_json_body_route_reads_bodies_the_same_way(api: Api) -> None:
    world_id = await running_world(api)
    tick = f"/api/v1/worlds/{world_id}/scheduler/tick"
    r = await api.client.post(tick, content=b'{"deltaSeconds": 1}', headers={"Content-Type": FORM})
    assert r.status_code == 200, r.text
    assert await world_state(api.store, world_id) == (pytest.approx(60.0), 1)
    r = await api.client.post(tick, content=b'{"deltaSeconds": 1}')
    assert r.status_code == 200, r.text
    r = await api.client.post(tick, content=b'{"deltaSeconds": 1}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    complete = "/api/v1/generation/1/complete"
    r = await api.client.post(complete, content=b'{"status": "succeeded"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = await api.client.post(complete, content=b'{"status": "succeeded"}', headers={"Content-Type": FORM})
    assert r.status_code == 404, r.text  # read as JSON: an unknown request
    async with api.store.connect() as conn:  # nothing was created along the way
        assert (await conn.execute(generation_requests.select())).first() is None


async def test_bad_json_is_still_422_and_the_token_is_checked_first(api: Api) -> None:
    world_id = await running_world(api)
    r = await api.client.put(config_url(world_id), content=b'{"timeScale": ')
    assert r.status_code == 422 and "JSON" in json.dumps(r.json())
    r = await api.client.put(config_url(world_id), content=b'{"timeScale": 0}', headers={"Content-Type": FORM})
    assert r.status_code == 422 and "timeScale" in r.text  # read as JSON, then validated
    r = await api.client.put(
        config_url(world_id), content=GUIDE_BODY, headers={"Content-Type": "text/plain", "Authorization": "Bearer x"}
    )
    assert r.status_code == 401
    # Routes without a body ignore what is sent, as before.
    r = await api.client.post(
        f"/api/v1/worlds/{world_id}/scheduler/pause", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 200


async def test_openapi_documents_415_on_the_json_body_routes(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    with_body = {
        (path, method) for path, ops in spec["paths"].items() for method, op in ops.items() if "requestBody" in op
    }
    assert ("/api/v1/worlds/{world_id}/scheduler/config", "put") in with_body
    assert ("/api/v1/worlds/{world_id}/scheduler/tick", "post") in with_body
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            documented = "415" in op["responses"]
            assert documented == ((path, method) in with_body), (path, method)
    put = spec["paths"]["/api/v1/worlds/{world_id}/scheduler/config"]["put"]
    assert "application/json" in put["responses"]["415"]["description"]
    assert "application/x-www-form-urlencoded" in spec["info"]["description"]


async def test_the_ingest_routes_read_bodies_the_same_way(api: Api) -> None:
    world = {"name": "Harbor", "externalId": "harbor", "simulation": {"timeScale": 60}}
    r = await api.client.post("/api/v1/worlds", content=json.dumps(world).encode(), headers={"Content-Type": FORM})
    assert r.status_code == 201, r.text
    npcs = json.dumps([{"externalId": "ann", "name": "Ann"}]).encode()
    r = await api.client.put("/api/v1/worlds/ext:harbor/npcs", content=npcs)
    assert r.status_code == 200, r.text
    r = await api.client.put("/api/v1/worlds/ext:harbor/npcs", content=npcs, headers={"Content-Type": "text/csv"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"]
