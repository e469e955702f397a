"""The ingest API of the real daemon: from an empty database to a ticking world with a player, and back.

Discovery polls only every 60 s here, so a world that starts ticking within
seconds was started by the API's own change notification, not by the poll.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process.test_daemon_world_time import _reset_pg, cli, poll
from tests.process.test_http_process import Daemon, base_env, start_daemon, stop

pytestmark = pytest.mark.subprocess


@pytest.fixture
def daemon(db_url: str, tmp_path: Path) -> Iterator[Daemon]:
    _reset_pg(db_url)
    env = {**base_env(db_url, tmp_path), "SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS": "60"}
    assert cli("db", "upgrade", env=env).returncode == 0
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(short) / "notify.sock"))
        try:
            started = start_daemon(env, tmp_path, notify)
        finally:
            notify.close()
    try:
        yield started
    finally:
        code = stop(started)
        assert code == 0, started.log.read_text()[-2000:]


def test_a_game_brings_a_world_npcs_and_a_player_and_reads_decisions_back(daemon: Daemon) -> None:
    with daemon.client() as api:
        r = api.post(
            "/api/v1/worlds",
            json={
                "externalId": "harbor",
                "name": "Harbor",
                "simulation": {"timeScale": 600, "tickIntervalSeconds": 0.2},
            },
        )
        assert r.status_code == 201, r.text
        world_id = r.json()["id"]
        npcs = [{"externalId": f"npc-{i}", "name": f"N{i}", "location": "dock" if i < 2 else "hills"} for i in range(6)]
        r = api.put("/api/v1/worlds/ext:harbor/npcs", json=npcs)
        assert r.status_code == 200 and r.json()["created"] == 6, r.text
        assert api.put("/api/v1/worlds/ext:harbor/npcs", json=npcs).json()["created"] == 0  # idempotent

        def running() -> dict[str, Any] | None:
            listed = api.get("/api/v1/worlds").json()["worlds"]
            return next((w for w in listed if w["worldId"] == world_id and w["ticksProcessed"]), None)

        assert running() is None  # no session, not alwaysOn: not running
        r = api.put(
            "/api/v1/worlds/ext:harbor/sessions/ext:player-1",
            json={"userId": "player-1", "location": "dock", "sceneNpcIds": ["npc-5"]},
        )
        assert r.status_code == 201, r.text
        # The world was not running: the API asks for a discovery pass at once instead of the 60 s poll,
        # and registering it assigns the tiers before its first tick.
        poll(running, timeout=20, interval=0.1, what="the world to tick (registered at once, not at the next poll)")
        tiers = {n["externalId"]: n["tier"] for n in api.get("/api/v1/worlds/ext:harbor/npcs").json()["npcs"]}
        scene = {"npc-0": "detailed", "npc-1": "detailed", "npc-5": "detailed"}  # at the player's place, in the scene
        assert tiers == {**scene, "npc-2": "ambient", "npc-3": "ambient", "npc-4": "ambient"}

        def decided() -> list[dict[str, Any]]:
            page = api.get("/api/v1/worlds/ext:harbor/npcs", params={"tier": "detailed"}).json()["npcs"]
            return [n for n in page if n["lastDecisionAt"] is not None and n["currentActivity"] is not None]

        assert len(poll(lambda: len(decided()) == 3 and decided(), timeout=20, what="decisions of the scene")) == 3

        # The world runs now: a change is applied before the answer, so the tiers are there at once.
        r = api.put("/api/v1/worlds/ext:harbor/sessions/ext:player-1", json={"userId": "player-1", "location": "hills"})
        assert r.status_code == 200, r.text
        tiers = {n["externalId"]: n["tier"] for n in api.get("/api/v1/worlds/ext:harbor/npcs").json()["npcs"]}
        hills = dict.fromkeys(["npc-2", "npc-3", "npc-4", "npc-5"], "detailed")
        assert tiers == {**hills, "npc-0": "ambient", "npc-1": "ambient"}

        assert api.delete("/api/v1/worlds/ext:harbor/sessions/ext:player-1").status_code == 204
        tiers = {n["externalId"]: n["tier"] for n in api.get("/api/v1/worlds/ext:harbor/npcs").json()["npcs"]}
        assert set(tiers.values()) == {"dormant"}
        assert api.delete("/api/v1/worlds/ext:harbor").status_code == 204
        assert api.get(f"/api/v1/worlds/{world_id}").status_code == 404
        assert all(w["worldId"] != world_id for w in api.get("/api/v1/worlds").json()["worlds"])
