"""Import and export files on both backends: upserts by external id, one transaction per world, round trips.

The command line's own behaviour (exit codes, progress bar, stdin) is in
``tests/process/test_transfer_cli.py``; here the library runs in-process.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler_daemon.progress import ProgressBar
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.repository import Store
from scheduler_daemon.transfer import exporter
from scheduler_daemon.transfer.exporter import export_worlds
from scheduler_daemon.transfer.files import FileFormat, open_import_file
from scheduler_daemon.transfer.importer import import_worlds
from scheduler_daemon.transfer.report import ImportSummary
from scheduler_daemon.transfer.schema import FileDocument, FileWorld
from tests.conftest import create_pg_database, drop_pg_database, require_postgres_url


async def counts(store: Store) -> dict[str, int]:
    async with store.connect() as conn:
        return {
            t: int((await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar_one())
            for t in ("worlds", "world_states", "npcs", "sessions")
        }


async def run_import(store: Store, path: Path, *, dry_run: bool = False) -> tuple[ImportSummary, str]:
    """Import a file as the command does; the summary and the messages it printed."""
    messages = io.StringIO()
    with open_import_file(str(path)) as source:
        bar = ProgressBar(messages, "importing", source.total, enabled=False)
        summary = await import_worlds(store, source, dry_run=dry_run, defaults={}, progress=bar)
    return summary, messages.getvalue()


async def run_export(store: Store, fmt: FileFormat = FileFormat.JSON, world_ids: list[int] | None = None) -> str:
    out = io.StringIO()
    await export_worlds(store, world_ids, out, fmt)
    return out.getvalue()


def worlds_of(text: str, fmt: FileFormat = FileFormat.JSON) -> list[dict[str, Any]]:
    if fmt is FileFormat.JSON:
        worlds: list[dict[str, Any]] = json.loads(text)["worlds"]
        return worlds
    return [json.loads(line) for line in text.splitlines()]


def without_daemon_ids(worlds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worlds with every daemon id removed; a session's reference by id becomes the NPC's position."""
    out = []
    for world in worlds:
        position = {npc["id"]: i for i, npc in enumerate(world["npcs"])}
        sessions = [
            {
                **{k: v for k, v in s.items() if k != "id"},
                **{
                    key: [f"npcs[{position[r]}]" if isinstance(r, int) else r for r in s[key]]
                    for key in ("sceneNpcIds", "involvedNpcIds")
                },
            }
            for s in world["sessions"]
        ]
        npcs = [{k: v for k, v in n.items() if k != "id"} for n in world["npcs"]]
        out.append({**{k: v for k, v in world.items() if k != "id"}, "npcs": npcs, "sessions": sessions})
    return out


@pytest.fixture
async def empty_store(backend: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A second migrated, empty database on the same backend (the target of a round trip)."""
    if backend == "sqlite":
        url, drop = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}", None
    else:
        url = drop = create_pg_database(require_postgres_url(), prefix="sched_transfer")
    target = Store.from_url(url)
    try:
        await target.upgrade()
        yield target
    finally:
        await target.dispose()
        if drop is not None:
            drop_pg_database(drop)


async def seed_source(store: Store) -> tuple[int, int]:
    """Two worlds as a game leaves them: external ids or not, daemon fields set by real ticks, a closed session."""
    async with store.transaction() as conn:
        harbor = await store.upsert_world(
            conn,
            name="Harbor",
            meta={"simulation": {"timeScale": 60, "alwaysOn": True}, "owner": {"team": "ops"}},
            external_id="harbor",
            world_time=7200.0,
        )
        ids = await store.upsert_npcs(
            conn,
            harbor.id,
            [
                {"external_id": "bob", "name": "Bob", "location": "dock", "home": "inn", "state": {"needs": {"a": 1}}},
                {"name": "Anon", "location": "dock", "energy": 55.25, "mood_valence": -0.5},
                {"external_id": "eve", "name": "Eve", "routine": "worker", "mood_arousal": 0.75},
            ],
        )
        anon = ids[1][0]
        await store.upsert_session(
            conn,
            harbor.id,
            {"external_id": "s1", "user_id": "u1", "location": "dock", "scene_npc_ids": ["bob", anon]},
        )
        await store.upsert_session(
            conn, harbor.id, {"user_id": "u0", "involved_npc_ids": ["eve"], "active": False, "location": None}
        )
        plain = await store.upsert_world(conn, name="Plain", meta={}, world_time=0.0)
        await store.upsert_npcs(conn, plain.id, [{"name": f"n{i}", "next_decision_at": 10.0 * i} for i in range(3)])
    scheduler = WorldScheduler(store)
    await scheduler.register_world(harbor.id)
    for _ in range(3):
        await scheduler.tick_world(harbor.id, 60.0)
    return harbor.id, plain.id


@pytest.mark.parametrize("fmt", list(FileFormat))
async def test_export_then_import_into_an_empty_database_round_trips(
    store: Store, empty_store: Store, tmp_path: Path, fmt: FileFormat
) -> None:
    await seed_source(store)
    first = await run_export(store, fmt)
    exported = worlds_of(first, fmt)
    harbor = exported[0]
    # Ticks ran: the daemon's fields are in the file, and the world time moved on from 7200.
    assert harbor["worldTime"] == 7200.0 + 3 * 60 * 60
    assert any(npc["decisions"] > 0 for npc in harbor["npcs"])
    assert {npc["tier"] for npc in harbor["npcs"]} <= {"detailed", "active", "ambient", "dormant", "frozen"}
    # A session names NPCs by external id where they have one, else by the id the NPC shows in the file.
    assert harbor["sessions"][0]["sceneNpcIds"] == ["bob", harbor["npcs"][1]["id"]]
    assert harbor["sessions"][1]["active"] is False

    path = tmp_path / f"export.{fmt}"
    path.write_text(first)
    summary, messages = await run_import(empty_store, path)
    assert messages == ""
    assert (summary.worlds_created, summary.npcs_created, summary.sessions_created) == (2, 6, 2)
    second = await run_export(empty_store, fmt)
    assert without_daemon_ids(worlds_of(second, fmt)) == without_daemon_ids(exported)
    assert await counts(empty_store) == await counts(store)


async def test_import_twice_updates_by_external_id_without_duplicates(store: Store, tmp_path: Path) -> None:
    world = {
        "externalId": "harbor",
        "name": "Harbor",
        "simulation": {"timeScale": 10},
        "worldTime": 500.0,
        "npcs": [{"externalId": "bob", "name": "Bob", "energy": 80}, {"externalId": "eve", "name": "Eve"}],
        "sessions": [{"externalId": "s1", "userId": "u1", "sceneNpcIds": ["bob"], "involvedNpcIds": ["eve"]}],
    }
    path = tmp_path / "worlds.ndjson"
    path.write_text(json.dumps(world) + "\n" + json.dumps({**world, "externalId": "cove", "name": "Cove"}) + "\n")
    summary, _ = await run_import(store, path)
    assert (summary.worlds_created, summary.npcs_created, summary.sessions_created) == (2, 4, 2)
    before = await counts(store)

    world.update(name="Harbor 2", worldTime=99.0)
    world["npcs"][0]["energy"] = 20.5  # type: ignore[index]
    world["npcs"].append({"externalId": "kim", "name": "Kim"})  # type: ignore[attr-defined]
    world["sessions"][0].update(active=False, involvedNpcIds=["kim"])  # type: ignore[index]
    path.write_text(json.dumps(world) + "\n")
    summary, _ = await run_import(store, path)
    assert summary.to_wire()["worlds"] == {"created": 0, "updated": 1, "failed": 0}
    assert summary.to_wire()["npcs"] == {"created": 1, "updated": 2}
    assert summary.to_wire()["sessions"] == {"created": 0, "updated": 0, "closed": 1}
    assert await counts(store) == {**before, "npcs": before["npcs"] + 1}

    (harbor,) = worlds_of(await run_export(store, world_ids=[await store.resolve_world("harbor")]))
    assert harbor["name"] == "Harbor 2"
    assert harbor["worldTime"] == 500.0  # the clock is set on creation only: the daemon owns it afterwards
    assert [(n["externalId"], n["energy"]) for n in harbor["npcs"]] == [("bob", 20.5), ("eve", 100.0), ("kim", 100.0)]
    (session,) = harbor["sessions"]
    assert (session["active"], session["sceneNpcIds"], session["involvedNpcIds"]) == (False, ["bob"], ["kim"])


async def test_a_bad_world_commits_nothing_of_itself_and_the_others_go_on(store: Store, tmp_path: Path) -> None:
    good = {"externalId": "good", "name": "Good", "npcs": [{"externalId": "a", "name": "A"}]}
    bad_field = {
        "externalId": "bad",
        "name": "Bad",
        "npcs": [{"name": f"n{i}"} for i in range(12)] + [{"name": "x", "energy": "high"}],
    }
    bad_refs = {
        "externalId": "refs",
        "name": "Refs",
        "npcs": [{"id": 5, "externalId": "bob", "name": "Bob"}],
        "sessions": [
            {"userId": "u", "sceneNpcIds": [5, "bob"]},
            {"userId": "v", "sceneNpcIds": ["ghost", 5], "involvedNpcIds": [12345]},
        ],
    }
    lines = [json.dumps(good), "{not json", json.dumps(bad_field), json.dumps(bad_refs), json.dumps(good)]
    path = tmp_path / "worlds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary, messages = await run_import(store, path)
    assert messages.splitlines() == [
        "line 2: worlds[1]: not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 3: worlds[2].npcs[12].energy: Input should be a valid number",
        'line 4: worlds[3].sessions[1]: NPCs in neither the file nor the world: "ghost", 12345',
    ]
    assert [(f.line, f.index, f.external_id) for f in summary.failures] == [
        (2, 1, None),
        (3, 2, "bad"),
        (4, 3, "refs"),
    ]
    # The good world was created, then updated by its second line; nothing of the rejected ones is there.
    assert (summary.worlds_created, summary.worlds_updated) == (1, 1)
    assert await counts(store) == {"worlds": 1, "world_states": 1, "npcs": 1, "sessions": 0}


async def test_checks_beyond_the_models_name_their_fields(store: Store, tmp_path: Path) -> None:
    world = {
        "name": "Checked",
        "simulation": {"timeScale": 0, "tiers": {"detailed": {"maxNpcs": -1}}},
        "npcs": [{"externalId": "a", "name": "A"}, {"externalId": "a", "id": 3, "name": "B"}, {"id": 3, "name": "C"}],
        "sessions": [{"externalId": "s", "userId": "u"}, {"externalId": "s", "userId": "v"}],
    }
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"worlds": [world]}, indent=1))
    summary, _ = await run_import(store, path)
    (failure,) = summary.failures
    assert failure.line == 3
    assert failure.problems == [
        "worlds[0].simulation.timeScale: Input should be greater than 0",
        "worlds[0].simulation.tiers.detailed.maxNpcs: Input should be greater than or equal to 0",
        'worlds[0].npcs[1].externalId: "a" is also npcs[0]\'s',
        "worlds[0].npcs[2].id: 3 is also npcs[1]'s",
        'worlds[0].sessions[1].externalId: "s" is also sessions[0]\'s',
    ]
    assert await counts(store) == {"worlds": 0, "world_states": 0, "npcs": 0, "sessions": 0}


async def test_session_references_to_existing_npcs_by_id_and_external_id(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "w.ndjson"
    path.write_text(json.dumps({"externalId": "w", "name": "W", "npcs": [{"externalId": "bob", "name": "Bob"}]}))
    await run_import(store, path)
    world_id = await store.resolve_world("w")
    bob = (await store.npc_page(world_id)).rows[0]["id"]
    # A later file brings only a session: it names NPCs of the world by daemon id and by external id.
    session = {"externalId": "s", "userId": "u", "sceneNpcIds": [bob], "involvedNpcIds": ["bob"]}
    path.write_text(json.dumps({"externalId": "w", "name": "W", "sessions": [session]}))
    summary, messages = await run_import(store, path)
    assert (messages, summary.sessions_created) == ("", 1)
    (stored,) = await store.world_sessions(world_id)
    assert (stored["scene_npc_ids"], stored["involved_npc_ids"]) == ([bob], [bob])


async def test_dry_run_commits_nothing_and_reports_what_the_import_does(store: Store, tmp_path: Path) -> None:
    await seed_source(store)
    path = tmp_path / "export.json"
    path.write_text(await run_export(store))
    bad = {
        "externalId": "new",
        "name": "New",
        "npcs": [{"name": "n"}],
        "sessions": [{"userId": "u", "sceneNpcIds": [9]}],
    }
    text = path.read_text()
    path.write_text(text[: text.rindex("]")].rstrip() + ",\n  " + json.dumps(bad) + "\n]}\n")
    async with store.connect() as conn:
        before = (await conn.execute(sa.text("SELECT * FROM npcs ORDER BY id"))).all()
    dry, dry_messages = await run_import(store, path, dry_run=True)
    async with store.connect() as conn:
        assert (await conn.execute(sa.text("SELECT * FROM npcs ORDER BY id"))).all() == before
    assert dry.dry_run
    real, messages = await run_import(store, path)
    assert dry_messages == messages != ""
    assert {**dry.to_wire(), "dryRun": False} == real.to_wire()


async def test_export_reads_npcs_a_page_at_a_time(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    world_id = await store.create_world("big", simulation={})
    await store.add_npcs(world_id, [{"name": f"n{i}"} for i in range(7)])
    monkeypatch.setattr(exporter, "NPCS_PER_PAGE", 3)  # three pages, the last one short
    (world,) = worlds_of(await run_export(store, FileFormat.NDJSON), FileFormat.NDJSON)
    assert [n["name"] for n in world["npcs"]] == [f"n{i}" for i in range(7)]


async def test_snapshot_reads_do_not_see_later_commits(store: Store) -> None:
    world_id = await store.create_world("w", simulation={})
    async with store.snapshot() as conn:
        first = await store.npc_page(world_id, conn=conn)
        await store.add_npcs(world_id, [{"name": "late"}])
        assert (await store.npc_page(world_id, conn=conn)).rows == first.rows == []
    assert len((await store.npc_page(world_id)).rows) == 1


async def test_an_export_validates_against_the_shipped_schema_and_the_models(store: Store) -> None:
    await seed_source(store)
    text = await run_export(store)
    # The models the schema is generated from accept the file as it is.
    FileDocument.model_validate_json(text)
    for line in (await run_export(store, FileFormat.NDJSON)).splitlines():
        FileWorld.model_validate_json(line)
    # And so does a JSON Schema validator, reading the schema file the package ships.
    jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="installed with schemathesis (dev dependencies)")
    schema = json.loads(resources.files("scheduler_daemon").joinpath("schemas", "import.schema.json").read_text())
    validator = jsonschema_rs.validator_for(schema)
    assert list(validator.iter_errors(json.loads(text))) == []
    broken = json.loads(text)
    broken["worlds"][0]["npcs"][0]["energy"] = "high"
    assert [e.instance_path for e in validator.iter_errors(broken)] == [["worlds", 0, "npcs", 0, "energy"]]


async def test_a_value_the_database_cannot_store_rejects_its_world_and_the_others_go_on(
    store: Store, tmp_path: Path
) -> None:
    # decisions is a BIGINT: past 2**63 - 1 PostgreSQL raised "bigint out of range" and stopped the
    # whole import as a database error, and SQLite's driver raised OverflowError (a traceback).
    lines = [
        {"externalId": "big", "name": "Big", "npcs": [{"name": "a"}, {"name": "b", "decisions": 2**63}]},
        {"externalId": "max", "name": "Max", "npcs": [{"name": "c", "decisions": 2**63 - 1}]},
    ]
    path = tmp_path / "w.ndjson"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, messages = await run_import(store, path)
    assert (
        messages == "line 1: worlds[0].npcs[1].decisions: Input should be less than or equal to 9223372036854775807\n"
    )
    assert (summary.worlds_created, summary.npcs_created) == (1, 1)
    assert await counts(store) == {"worlds": 1, "world_states": 1, "npcs": 1, "sessions": 0}
    (world,) = worlds_of(await run_export(store))
    assert world["npcs"][0]["decisions"] == 2**63 - 1


@pytest.mark.postgres
async def test_a_world_that_loses_a_deadlock_is_imported_again(pg_store: Store, tmp_path: Path) -> None:
    # A running daemon's tick and an import lock a world's NPC rows in different orders; PostgreSQL
    # ends one of them. The import stopped there (exit 3, later worlds not tried); now it runs the
    # world's transaction again. The daemon's side is played by a connection that locks an NPC
    # first, then the world row the import holds, and waits longer than the import to detect it.
    world = {"externalId": "w", "name": "W", "npcs": [{"externalId": "a", "name": "A", "energy": 10.0}]}
    path = tmp_path / "w.ndjson"
    path.write_text(json.dumps(world) + "\n")
    await run_import(pg_store, path)
    world_id = await pg_store.resolve_world("w")
    npc_id = (await pg_store.npc_page(world_id)).rows[0]["id"]
    world["npcs"][0]["energy"] = 20.0  # type: ignore[index]
    path.write_text(json.dumps(world) + "\n" + json.dumps({**world, "externalId": "later"}) + "\n")

    async def waiting_for_a_lock() -> int:
        async with pg_store.connect() as conn:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return int((await conn.execute(sa.text(query))).scalar_one())

    async with pg_store.engine.connect() as tick:
        await tick.execute(sa.text("SET deadlock_timeout = '60s'"))
        await tick.execute(sa.text("UPDATE npcs SET energy = 0 WHERE id = :n"), {"n": npc_id})
        importing = asyncio.create_task(run_import(pg_store, path))
        deadline = asyncio.get_running_loop().time() + 30
        while not await waiting_for_a_lock():  # the import holds the world row and waits for the NPC
            assert asyncio.get_running_loop().time() < deadline, "the import never waited for the NPC's lock"
            await asyncio.sleep(0.05)
        await tick.execute(sa.text("SELECT id FROM worlds WHERE id = :w FOR UPDATE"), {"w": world_id})
        await tick.commit()
    summary, messages = await asyncio.wait_for(importing, timeout=60)
    assert (messages, summary.worlds_updated, summary.worlds_created, summary.npcs_updated) == ("", 1, 1, 1)
    assert (await pg_store.npc_page(world_id)).rows[0]["energy"] == 20.0


async def test_an_unlabelled_id_never_names_an_npc_the_same_import_created(store: Store, tmp_path: Path) -> None:
    # In an empty database the world's first NPC gets id 1: a session's 1 must not name it by chance.
    world = {"externalId": "w", "name": "W", "npcs": [{"name": "n"}], "sessions": [{"userId": "u", "sceneNpcIds": [1]}]}
    path = tmp_path / "w.ndjson"
    path.write_text(json.dumps(world) + "\n")
    summary, messages = await run_import(store, path)
    assert messages == "line 1: worlds[0].sessions[0]: NPCs in neither the file nor the world: 1\n"
    assert await counts(store) == {"worlds": 0, "world_states": 0, "npcs": 0, "sessions": 0}
    # Labelled, the same reference is the file's NPC, whatever id it gets.
    world["npcs"] = [{"id": 1, "name": "n"}]
    path.write_text(json.dumps(world) + "\n")
    summary, messages = await run_import(store, path)
    assert (messages, summary.sessions_created) == ("", 1)
    (npc,) = (await store.npc_page(await store.resolve_world("w"))).rows
    (session,) = await store.world_sessions(await store.resolve_world("w"))
    assert session["scene_npc_ids"] == [npc["id"]]
