"""The ingest store layer on both backends: external ids, upserts, references, all-or-nothing writes, paged reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store import migrate
from scheduler_daemon.store.database import begin_writing
from scheduler_daemon.store.errors import (
    EntityRowsError,
    ExternalIdTakenError,
    NpcNotFoundError,
    SessionNotFoundError,
    UnknownNpcsError,
    WorldNotFoundError,
    is_unique_violation,
)
from scheduler_daemon.store.models import metadata
from scheduler_daemon.store.repository import Store


async def counts(store: Store) -> dict[str, int]:
    async with store.connect() as conn:
        return {
            t: int((await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar_one())
            for t in ("worlds", "world_states", "npcs", "sessions")
        }


async def new_world(store: Store, external_id: str | None = "harbor", **meta: Any) -> int:
    async with store.transaction() as conn:
        done = await store.insert_world(conn, name="Harbor", meta=meta, external_id=external_id)
    return done.id


# ------------------------------------------------------------------ schema
@pytest.fixture
async def own_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated store on a database of this test's own: the shared one may hold other tests' tables."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    else:
        url = request.getfixturevalue("pg_scratch_url")
    store = Store.from_url(url)
    await store.upgrade()
    try:
        yield store
    finally:
        await store.dispose()


async def test_migration_matches_the_models_and_downgrades(own_store: Store) -> None:
    store = own_store

    def differences(conn: sa.Connection) -> list[Any]:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        # The DESC index of generation requests compares as different on every revision.
        return [d for d in diff if "ix_generation_requests_world_id_status_priority_id" not in str(d)]

    async with store.connect() as conn:
        assert await conn.run_sync(differences) == []
    async with begin_writing(store.engine) as conn:
        await conn.run_sync(lambda c: command.downgrade(migrate._alembic_config(c), "0009"))
    await store.upgrade()
    # The meta trigger of 0009 survives 0010 (no table was recreated).
    world_id = await new_world(store, simulation={"timeScale": 1})
    async with store.transaction() as conn:
        await conn.execute(sa.text("UPDATE worlds SET meta = '{\"simulation\": {}}' WHERE id = :w"), {"w": world_id})
    assert (await store.get_world(world_id)).config_version == 2


async def test_external_ids_are_unique_per_world_and_null_never_conflicts(store: Store) -> None:
    w1, w2 = await new_world(store, "a"), await new_world(store, "b")
    await new_world(store, None)
    await new_world(store, None)
    async with store.transaction() as conn:
        await store.upsert_npcs(conn, w1, [{"external_id": "bob", "name": "Bob"}, {"name": "x"}, {"name": "y"}])
        await store.upsert_npcs(conn, w2, [{"external_id": "bob", "name": "Bob"}])  # another world: fine
    with pytest.raises(sa.exc.IntegrityError) as caught:
        async with store.transaction() as conn:
            await conn.execute(
                sa.text("INSERT INTO npcs (world_id, name, state, external_id) VALUES (:w, 'B', '{}', 'bob')"),
                {"w": w1},
            )
    assert is_unique_violation(caught.value)


# ------------------------------------------------------------------ worlds
async def test_worlds_by_reference_insert_update_delete(store: Store) -> None:
    world_id = await new_world(store, simulation={"timeScale": 2}, owner="game")
    assert await store.resolve_world(world_id) == world_id
    assert await store.resolve_world("harbor") == world_id
    for missing in (world_id + 1, "nope"):
        with pytest.raises(WorldNotFoundError, match=r"world (ext:nope|\d+) does not exist"):
            await store.resolve_world(missing)
    async with store.transaction() as conn:
        again = await store.insert_world(conn, name="Other", meta={}, external_id="harbor")
    assert (again.id, again.created) == (world_id, False)  # nothing written
    stored = await store.world_by_ref("harbor")
    assert (stored.name, stored.meta, stored.config_version, stored.world_time) == (
        "Harbor",
        {"simulation": {"timeScale": 2}, "owner": "game"},
        1,
        0.0,
    )
    async with store.transaction() as conn:
        same = await store.update_world(conn, world_id, name="Harbor", meta=stored.meta)
        assert same.config_version == 1  # nothing differed: nothing written
        renamed = await store.update_world(conn, world_id, name="Port", meta={"owner": "x"}, external_id="port")
    assert (renamed.name, renamed.external_id, renamed.meta, renamed.config_version) == (
        "Port",
        "port",
        {"owner": "x"},
        2,
    )
    other = await new_world(store, "other")
    with pytest.raises(ExternalIdTakenError, match=f"'port' is already world {world_id}"):
        async with store.transaction() as conn:
            await store.update_world(conn, other, external_id="port")
    async with store.transaction() as conn:
        cleared = await store.update_world(conn, other, external_id=None)
    assert cleared.external_id is None
    async with store.transaction() as conn:
        assert await store.delete_world(conn, world_id) is True
        assert await store.delete_world(conn, world_id) is False
    assert (await counts(store))["world_states"] == 1


async def test_upsert_world_replaces_name_and_meta_and_sets_the_clock_only_on_insert(store: Store) -> None:
    async with store.transaction() as conn:
        first = await store.upsert_world(conn, name="A", meta={"simulation": {}}, external_id="w", world_time=500.0)
        second = await store.upsert_world(conn, name="B", meta={"k": 1}, external_id="w", world_time=9.0)
    assert (first.created, second.created, first.id) == (True, False, second.id)
    stored = await store.world_by_ref("w")
    assert (stored.name, stored.meta, stored.world_time, stored.config_version) == ("B", {"k": 1}, 500.0, 2)
    assert [w.id for w in await store.worlds_after(None, 10)] == [first.id]
    assert await store.worlds_after(first.id, 10) == []


# -------------------------------------------------------------------- NPCs
async def test_npc_upsert_inserts_updates_and_merges_state(store: Store) -> None:
    world_id = await new_world(store)
    async with store.transaction() as conn:
        done = await store.upsert_npcs(
            conn,
            world_id,
            [
                {"external_id": "bob", "name": "Bob", "location": "dock", "state": {"hunger": 3, "cooldowns": {}}},
                {"name": "Anon"},
            ],
        )
    assert [c for _, c in done] == [True, True]
    bob, anon = (i for i, _ in done)
    async with store.transaction() as conn:
        again = await store.upsert_npcs(
            conn,
            world_id,
            [
                {"external_id": "bob", "name": "Bob", "state": {"hunger": 5}},
                {"id": anon, "external_id": "anon", "name": "Anon", "energy": 40.0},
            ],
        )
    assert again == [(bob, False), (anon, False)]
    page = await store.npc_page(world_id)
    rows = {r["id"]: r for r in page.rows}
    assert rows[bob]["location"] == "dock"  # not sent: kept
    assert rows[bob]["state"] == {"hunger": 5, "cooldowns": {}}  # top-level merge
    assert (rows[anon]["external_id"], rows[anon]["energy"]) == ("anon", 40.0)
    assert rows[bob]["tier"] == int(Tier.DORMANT) and rows[bob]["problem"] is None
    assert await store.npc_page(world_id, tier=Tier.DETAILED) == type(page)([], None)
    async with store.connect() as conn:
        assert await store.resolve_npc(conn, world_id, "anon") == anon
        with pytest.raises(NpcNotFoundError, match=f"world {world_id}: npc ext:zed does not exist"):
            await store.resolve_npc(conn, world_id, "zed")


async def test_a_rejected_npc_batch_writes_nothing_and_names_every_item(store: Store) -> None:
    world_id = await new_world(store)
    async with store.transaction() as conn:
        [(bob, _), (ann, _)] = await store.upsert_npcs(
            conn, world_id, [{"external_id": "bob", "name": "Bob"}, {"external_id": "ann", "name": "Ann"}]
        )
    before = await counts(store)
    with pytest.raises(EntityRowsError) as caught:
        async with store.transaction() as conn:
            await store.upsert_npcs(
                conn,
                world_id,
                [
                    {"external_id": "new", "name": "New"},
                    {"id": 999_999, "name": "Ghost"},
                    {"id": bob, "external_id": "ann", "name": "Mixed"},
                    {"external_id": "bob", "name": "Bob"},
                    {"id": bob, "name": "Bob again"},
                ],
            )
    assert caught.value.problems == [
        (1, "id", f"NPC 999999 does not exist in world {world_id}"),
        (2, "id", f"externalId 'ann' is NPC {ann}, not {bob}"),
        (4, "id", f"NPC {bob} is also item 3"),
    ]
    assert await counts(store) == before


async def test_npc_pages_by_id_with_a_cursor(store: Store) -> None:
    world_id = await new_world(store)
    async with store.transaction() as conn:
        ids = [i for i, _ in await store.upsert_npcs(conn, world_id, [{"name": f"n{i}"} for i in range(5)])]
    first = await store.npc_page(world_id, limit=2)
    assert [r["id"] for r in first.rows] == ids[:2] and first.next_cursor == ids[1]
    rest = await store.npc_page(world_id, after=first.next_cursor, limit=3)
    assert [r["id"] for r in rest.rows] == ids[2:] and rest.next_cursor is None


# ---------------------------------------------------------------- sessions
async def test_sessions_resolve_npc_references_and_close(store: Store) -> None:
    world_id = await new_world(store)
    async with store.transaction() as conn:
        [(bob, _), (ann, _)] = await store.upsert_npcs(
            conn, world_id, [{"external_id": "bob", "name": "Bob"}, {"name": "Ann"}]
        )
        opened = await store.upsert_session(
            conn,
            world_id,
            {
                "external_id": "s1",
                "user_id": "u1",
                "location": "dock",
                "scene_npc_ids": ["bob", ann],
                "involved_npc_ids": [],
            },
        )
    assert opened.created
    [session] = await store.world_sessions(world_id)
    assert (session["external_id"], session["scene_npc_ids"], session["active"]) == ("s1", [bob, ann], True)
    before = await counts(store)
    with pytest.raises(UnknownNpcsError) as caught:
        async with store.transaction() as conn:
            await store.upsert_session(
                conn, world_id, {"external_id": "s2", "user_id": "u2", "scene_npc_ids": ["bob", "zed", 999_999]}
            )
    assert caught.value.refs == ["zed", 999_999]
    assert "no such NPCs: ext:zed, 999999" in str(caught.value)
    assert await counts(store) == before
    with pytest.raises(SessionNotFoundError, match="session 999999 does not exist"):
        async with store.transaction() as conn:
            await store.upsert_session(conn, world_id, {"id": 999_999, "user_id": "u"})
    async with store.transaction() as conn:
        assert await store.close_session(conn, world_id, opened.id) is True
        assert await store.close_session(conn, world_id, opened.id) is False
        reopened = await store.upsert_session(conn, world_id, {"id": opened.id, "user_id": "u1"})
    assert reopened == type(reopened)(opened.id, False)
    [session] = await store.world_sessions(world_id)
    assert (session["active"], session["scene_npc_ids"], session["external_id"]) == (True, [], "s1")


async def test_deleting_an_npc_takes_it_out_of_sessions(store: Store) -> None:
    world_id = await new_world(store)
    async with store.transaction() as conn:
        [(bob, _), (ann, _)] = await store.upsert_npcs(conn, world_id, [{"name": "Bob"}, {"name": "Ann"}])
        await store.upsert_session(
            conn, world_id, {"user_id": "u", "scene_npc_ids": [bob], "involved_npc_ids": [ann, bob]}
        )
    async with store.transaction() as conn:
        assert await store.delete_npc(conn, world_id, bob) is True
        assert await store.delete_npc(conn, world_id, bob) is False
    [session] = await store.world_sessions(world_id)
    assert (session["scene_npc_ids"], session["involved_npc_ids"]) == ([], [ann])


async def test_an_npc_deleted_while_a_session_naming_it_is_written_leaves_no_trace(pg_store: Store) -> None:
    # The session write resolved bob and had not committed; the delete's session scan did not
    # see it and committed first: the session then named an NPC that no longer existed.
    store = pg_store
    world_id = await new_world(store)
    async with store.transaction() as conn:
        [(bob, _)] = await store.upsert_npcs(conn, world_id, [{"name": "Bob"}])

    async def delete_bob() -> None:
        async with store.transaction() as conn:
            await store.delete_npc(conn, world_id, bob)

    async with store.transaction() as conn:
        await store.upsert_session(conn, world_id, {"external_id": "s", "user_id": "u", "scene_npc_ids": [bob]})
        deleting = asyncio.ensure_future(delete_bob())
        deadline = asyncio.get_running_loop().time() + 30
        while not deleting.done() and not await waits_for_a_lock(store):
            assert asyncio.get_running_loop().time() < deadline, "the delete neither ran nor waited"
            await asyncio.sleep(0.01)
    await deleting
    [session] = await store.world_sessions(world_id)
    assert session["scene_npc_ids"] == []


async def waits_for_a_lock(store: Store) -> bool:
    async with store.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return bool((await conn.execute(sa.text(query))).scalar_one())


async def test_one_transaction_per_world_commits_all_or_nothing(store: Store) -> None:
    before = await counts(store)
    with pytest.raises(UnknownNpcsError):
        async with store.transaction() as conn:
            world = await store.upsert_world(conn, name="W", meta={}, external_id="w")
            await store.upsert_npcs(conn, world.id, [{"external_id": "a", "name": "A"}])
            await store.upsert_session(conn, world.id, {"external_id": "s", "user_id": "u", "scene_npc_ids": ["b"]})
    assert await counts(store) == before
