"""``--json`` of every listing command: one object per line, the keys docs/operations.md documents (in-process CLI)."""

from __future__ import annotations

import asyncio
import json

import pytest

from scheduler_daemon import cli
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.store.test_jobs_cli import _seed
from tests.support.helpers import make_world

# The documented shapes (docs/operations.md, "Command-line output"): keys are only ever added.
WORLD_KEYS = {"id", "name", "state", "worldTime", "worldTimeHuman", "ticks", "timeScale", "problem"}
JOB_KEYS = {
    "id",
    "worldId",
    "sessionId",
    "userId",
    "npcId",
    "kind",
    "payload",
    "priority",
    "status",
    "attempts",
    "handedOff",
    "notBefore",
    "lastError",
    "createdAt",
    "enqueuedAt",
    "finishedAt",
}
CHAIN_KEYS = {
    "id",
    "worldId",
    "sessionId",
    "npcId",
    "chainKey",
    "steps",
    "currentStep",
    "startedAt",
    "nextStepAt",
    "completedAt",
    "status",
    "fired",
    "lastError",
}


def _json_lines(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    assert cli.main(list(args)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_listing_prints_json_lines_of_the_documented_shape(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world_id, claimed, pending = asyncio.run(_seed(db_url))
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", db_url)
    capsys.readouterr()

    (world,) = _json_lines(capsys, "worlds", "list", "--json")
    assert world == {
        "id": world_id,
        "name": "cli",
        "state": "running",  # the seeded session makes it active
        "worldTime": 3600.0,
        "worldTimeHuman": "day 1 Mon 01:00",
        "ticks": 1,
        "timeScale": 60.0,
        "problem": None,
    }
    assert set(world) == WORLD_KEYS

    jobs = _json_lines(capsys, "jobs", "list", "--json")
    assert [(j["id"], j["status"], j["kind"]) for j in jobs] == [
        (claimed, "enqueued", "portrait"),
        (pending, "pending", "voice"),
    ]
    assert all(set(j) == JOB_KEYS for j in jobs)
    assert _json_lines(capsys, "jobs", "list", "--json", "--status", "failed") == []  # empty: no line at all

    (chain,) = _json_lines(capsys, "chains", "list", "--json")
    assert set(chain) == CHAIN_KEYS
    assert (chain["chainKey"], chain["status"], chain["currentStep"]) == ("greet", "active", 1)

    # The table stays the default.
    assert cli.main(["worlds", "list"]) == 0
    assert capsys.readouterr().out.split()[:7] == ["ID", "NAME", "STATE", "WORLD", "TIME", "TICKS", "SCALE"]


async def _world_with_tiers(url: str) -> int:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        world_id, _ = await make_world(store, name="show", npcs_per_tier={Tier.DETAILED: 2, Tier.DORMANT: 3})
        return world_id
    finally:
        await store.dispose()


def test_worlds_show_names_the_population_tier_population(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world_id = asyncio.run(_world_with_tiers(db_url))
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", db_url)
    capsys.readouterr()
    assert cli.main(["worlds", "show", str(world_id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tierPopulation"] == {"detailed": 2, "active": 0, "ambient": 0, "dormant": 3, "frozen": 0}
    assert shown["npcsPerTier"] == shown["tierPopulation"]  # the deprecated name, its old meaning
