"""What a tick does with the stored NPC rows: keeps what it does not own, quarantines what it cannot read.

Against both real databases. A game keeps its own keys in an NPC's ``state``;
a decision must leave them alone. A row the daemon cannot decide (``state``
not a JSON object or over the size limit; on SQLite, which stores any value
in any column, a number column holding text) is quarantined: never decided,
never rewritten, reported (log, stats, ``worlds show``), and decided again
once fixed. Its neighbours tick on.
"""

from __future__ import annotations

import enum
import json
import math

import pytest
import sqlalchemy as sa

from scheduler_daemon.scheduler import TickResult, WorldScheduler
from scheduler_daemon.simulation.behavior import COOLDOWNS_KEY, BehaviorContent, decide
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier
from scheduler_daemon.store.models import npcs
from scheduler_daemon.store.repository import Store


async def _state(store: Store, npc_id: int) -> object:
    async with store.engine.connect() as conn:
        raw = (await conn.execute(sa.select(npcs.c.state).where(npcs.c.id == npc_id))).scalar_one()
    return json.loads(raw) if isinstance(raw, str) else raw


async def test_a_decision_keeps_the_games_own_state_keys(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "smith", "state": {"questStage": 3, "inventory": ["hammer"]}}])
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    for _ in range(3):
        result = await sched.tick_world(world_id, 3600.0 / 60)  # an hour of game time per tick
    assert result.npcs_simulated >= 0
    state = await _state(store, npc)
    assert isinstance(state, dict)
    assert state["questStage"] == 3 and state["inventory"] == ["hammer"], state
    assert COOLDOWNS_KEY in state  # the daemon's own key is there too
    rows = await store.get_npcs(world_id, [npc])
    assert rows[0].decisions >= 1 and rows[0].tier != Tier.FROZEN


async def _set_raw(store: Store, npc_id: int, column: str, sql_value: str, params: dict[str, object]) -> None:
    async with store.transaction() as conn:
        await conn.execute(sa.text(f"UPDATE npcs SET {column} = {sql_value} WHERE id = :id"), {"id": npc_id, **params})


async def _decisions(store: Store, npc_id: int) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.select(npcs.c.decisions).where(npcs.c.id == npc_id))).scalar_one())


async def test_a_row_with_a_state_that_is_no_object_is_quarantined_not_rewritten(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    good, bad = await store.add_npcs(world_id, [{"name": "good"}, {"name": "bad"}])
    cast = "CAST(:v AS jsonb)" if store.dialect == "postgresql" else ":v"
    await _set_raw(store, bad, "state", cast, {"v": json.dumps(["not", "an", "object"])})
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)  # registration's scan finds it
    assert set(ctx.quarantined_npcs) == {bad} and "state" in ctx.quarantined_npcs[bad]
    await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, good) == 1 and await _decisions(store, bad) == 0
    assert await _state(store, bad) == ["not", "an", "object"]  # never rewritten
    assert (await store.get_npcs(world_id, [bad])) == []
    assert set(await store.npc_problems(world_id)) == {bad}
    assert ctx.get_stats()["quarantined_npcs"] == {str(bad): ctx.quarantined_npcs[bad]}
    # Fixed: the next assignment releases it, and it is decided again.
    await _set_raw(store, bad, "state", cast, {"v": json.dumps({"fixed": True})})
    await sched.refresh_tiers(world_id)
    assert ctx.quarantined_npcs == {}
    await sched.tick_world(world_id, 7200.0 / 60)
    assert await _decisions(store, bad) == 1
    assert (await _state(store, bad))["fixed"] is True  # type: ignore[index]


async def test_a_row_going_bad_between_scans_is_quarantined_by_the_tick_itself(store: Store) -> None:
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    good, bad = await store.add_npcs(world_id, [{"name": "good"}, {"name": "bad"}])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert ctx.quarantined_npcs == {}
    if store.dialect == "postgresql":
        await _set_raw(store, bad, "state", "CAST(:v AS jsonb)", {"v": json.dumps("a string")})
    else:  # SQLite keeps any value in any column
        await _set_raw(store, bad, "energy", ":v", {"v": "very tired"})
    result = await sched.tick_world(world_id, 60.0)
    assert result.npcs_simulated == 1
    assert set(ctx.quarantined_npcs) == {bad}
    assert await _decisions(store, bad) == 0 and await _decisions(store, good) == 1
    tiers = {n: t for n, t in (await _tiers(store, world_id)).items()}
    assert tiers[bad] == Tier.FROZEN  # out of the selection, so it stops taking the budget


async def _tiers(store: Store, world_id: int) -> dict[int, Tier]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(npcs.c.id, npcs.c.tier).where(npcs.c.world_id == world_id))).all()
    return {int(r[0]): Tier(r[1]) for r in rows}


async def test_an_oversized_state_is_never_loaded(store: Store) -> None:
    from scheduler_daemon.store.base import MAX_NPC_STATE_BYTES

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (big,) = await store.add_npcs(world_id, [{"name": "hoarder", "state": {"junk": "x" * (MAX_NPC_STATE_BYTES + 1)}}])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert "larger than" in ctx.quarantined_npcs[big]
    await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, big) == 0


@pytest.mark.parametrize(("text", "over"), [("é" * 120_000, False), ("é" * 140_000, True), ("字" * 90_000, True)])
async def test_the_state_limit_counts_utf8_bytes_on_both_databases(store: Store, text: str, over: bool) -> None:
    """240,000 bytes of "é" are under the 262,144-byte limit, 280,000 and 270,000 bytes of "字" over it.

    SQLite stored the game's text escaped (6 bytes a character) and counted characters, so it
    quarantined the first and decided the last two; PostgreSQL counts the bytes of its own text.
    """
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "poet", "state": {"verse": text}}])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert (npc in ctx.quarantined_npcs) is over, ctx.quarantined_npcs
    await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, npc) == (0 if over else 1)


async def test_the_state_limit_counts_the_same_separators_on_both_databases(store: Store) -> None:
    """22,000 keys: 242,001 bytes written compactly, 286,000 as PostgreSQL's jsonb text (", ", ": "): over."""
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "clerk", "state": {f"k{i:05d}": 0 for i in range(22_000)}}])
    ctx = await WorldScheduler(store).register_world(world_id)
    assert npc in ctx.quarantined_npcs


async def test_sqlite_keeps_rewriting_a_world_whose_meta_holds_a_lone_surrogate(tmp_path: object) -> None:
    """Such rows exist (the embedding API and older API builds took them); UTF-8 cannot hold one: kept escaped."""
    from pathlib import Path

    store = Store.from_url(f"sqlite+aiosqlite:///{Path(str(tmp_path)) / 'db.sqlite'}")
    try:
        await store.upgrade()
        world_id = await store.create_world("w", simulation={"alwaysOn": True}, meta={"title": "x\ud800", "é": 1})
        record = await store.change_world_simulation(world_id, lambda r: {**r.simulation_raw, "timeScale": 2})
        assert record.meta["title"] == "x\ud800" and record.meta["é"] == 1
        assert record.simulation_raw == {"alwaysOn": True, "timeScale": 2}
    finally:
        await store.dispose()


async def test_sqlite_number_columns_holding_text_are_quarantined(tmp_path: object) -> None:
    from pathlib import Path

    store = Store.from_url(f"sqlite+aiosqlite:///{Path(str(tmp_path)) / 'db.sqlite'}")
    try:
        await store.upgrade()
        world_id = await store.create_world("w", simulation={"alwaysOn": True})
        ids = await store.add_npcs(world_id, [{"name": f"n{i}"} for i in range(4)])
        await _set_raw(store, ids[1], "next_decision_at", ":v", {"v": "soon"})  # never selected by the tick
        await _set_raw(store, ids[2], "decisions", ":v", {"v": 1.5})
        await _set_raw(store, ids[3], "state", ":v", {"v": "{not json"})
        sched = WorldScheduler(store)
        ctx = await sched.register_world(world_id)
        assert set(ctx.quarantined_npcs) == set(ids[1:])
        assert "next_decision_at" in ctx.quarantined_npcs[ids[1]]
        assert "decisions" in ctx.quarantined_npcs[ids[2]]
        assert "JSON" in ctx.quarantined_npcs[ids[3]]
        result = await sched.tick_world(world_id, 60.0)
        assert result.npcs_simulated == 1
    finally:
        await store.dispose()


async def test_a_state_beyond_64_bit_numbers_is_decided_and_kept(store: Store) -> None:
    """The hot path decodes states with orjson, which refuses integers beyond 64 bits; such a state still works."""
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    game = {"big": 2**70 + 1, "negative": -(2**64) - 3, "tiny": 5e-324, "text": "Zoë ✓"}
    (npc,) = await store.add_npcs(world_id, [{"name": "old-save", "state": game}])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    assert ctx.quarantined_npcs == {}
    for _ in range(6):  # six game hours: past any activity and the dormant interval, twice
        await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, npc) >= 2
    state = await _state(store, npc)
    assert isinstance(state, dict)
    assert {k: state[k] for k in game} == game
    assert ctx.quarantined_npcs == {}


@pytest.mark.postgres
async def test_a_non_finite_number_column_is_quarantined_by_the_tick(pg_store: Store) -> None:
    """PostgreSQL's float8 holds NaN and infinities; a row with one is quarantined, its neighbours decided."""
    store = pg_store
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    good, bad, worse = await store.add_npcs(world_id, [{"name": "good"}, {"name": "bad"}, {"name": "worse"}])
    sched = WorldScheduler(store)
    ctx = await sched.register_world(world_id)
    await _set_raw(store, bad, "energy", "'NaN'", {})
    await _set_raw(store, worse, "last_decision_at", "'-Infinity'", {})
    await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, good) == 1
    assert await _decisions(store, bad) == 0 and await _decisions(store, worse) == 0
    assert ctx.quarantined_npcs[bad] == "energy: expected a finite number, got nan"
    assert ctx.quarantined_npcs[worse] == "last_decision_at: expected a finite number or null, got -inf"


async def test_a_plugin_decision_with_a_non_finite_number_fails_its_world_alone(store: Store) -> None:
    """A plug-in decide returning NaN energy: that world's tick fails naming the NPC and column; others commit."""

    def nan_for_the_cursed(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        if npc.name == "cursed":
            decision.energy = math.nan
        return decision

    cursed_world = await store.create_world("cursed", simulation={"alwaysOn": True})
    (cursed,) = await store.add_npcs(cursed_world, [{"name": "cursed"}])
    fine_world = await store.create_world("fine", simulation={"alwaysOn": True})
    (fine,) = await store.add_npcs(fine_world, [{"name": "fine"}])
    sched = WorldScheduler(store, decide_fn=nan_for_the_cursed)
    await sched.register_world(cursed_world)
    await sched.register_world(fine_world)
    answers = await sched.tick_worlds([(cursed_world, 60.0), (fine_world, 60.0)])
    assert isinstance(answers[0], Exception) and "energy" in str(answers[0])
    if store.dialect == "postgresql":  # SQLite refuses it as NULL in a NOT NULL column
        assert str(answers[0]) == f"npc {cursed}: decision energy is not a finite number (nan)"
    assert not isinstance(answers[1], BaseException) and answers[1].npcs_simulated == 1
    assert await _decisions(store, fine) == 1


async def test_a_decided_state_equal_to_the_one_read_is_left_as_stored(store: Store) -> None:
    """Unchanged by the decision, the state is not written back: a game's write since the read stays."""
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    empty: dict[str, object] = {COOLDOWNS_KEY: {}}
    kept, changed = await store.add_npcs(
        world_id, [{"name": "kept", "state": empty}, {"name": "changed", "state": empty}]
    )
    read = await store.get_npcs(world_id)
    decisions = [decide(npc, BehaviorContent(), 3600.0, 60.0) for npc in read]
    assert decisions[0].state == read[0].state  # no content, no cooldowns: nothing to change
    decisions[1].state = {**read[1].state, "decided": True}
    cast = "CAST(:v AS jsonb)" if store.dialect == "postgresql" else ":v"
    for npc_id in (kept, changed):  # the game writes both meanwhile
        await _set_raw(store, npc_id, "state", cast, {"v": json.dumps({"game": npc_id})})
    async with store.transaction() as conn:
        await store.write_decisions_many(conn, [(world_id, decisions)], [read])
    assert await _state(store, kept) == {"game": kept}
    assert await _state(store, changed) == {"cooldowns": {}, "decided": True}
    assert await _decisions(store, kept) == 1 and await _decisions(store, changed) == 1


async def test_a_plugin_decision_changing_the_read_state_in_place_is_written(store: Store) -> None:
    """A plug-in decide may change ``npc.state`` itself and return it: equal to "the one read", it is still new."""

    def count_visits(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        npc.state["visits"] = npc.state.get("visits", 0) + 1
        decision.state = npc.state
        return decision

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "innkeeper", "state": {"visits": 0}}])
    sched = WorldScheduler(store, decide_fn=count_visits)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 60.0)
    assert await _decisions(store, npc) == 1
    state = await _state(store, npc)
    assert isinstance(state, dict) and state["visits"] == 1, state


@pytest.mark.postgres
async def test_a_plugin_decision_with_text_that_is_no_unicode_fails_its_world_naming_it(pg_store: Store) -> None:
    """A lone surrogate in an activity cannot be sent: the world's tick fails saying so, not "a number"."""

    def surrogate(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.current_activity = "nap\ud800"
        return decision

    store = pg_store
    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "sleeper"}])
    sched = WorldScheduler(store, decide_fn=surrogate)
    await sched.register_world(world_id)
    with pytest.raises(ValueError) as failed:
        await sched.tick_world(world_id, 60.0)
    assert str(failed.value).startswith(f"npc {npc}: decision current_activity is not valid Unicode text"), failed.value
    assert await _decisions(store, npc) == 0


def _deep(levels: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(levels):
        value = {"d": value}
    return value


class _Mood(enum.StrEnum):
    NAP = "nap"


_UNWRITABLE = [
    pytest.param("current_activity", "nap\x00", "decision current_activity holds a NUL character", id="nul-activity"),
    pytest.param("location", "inn\x00", "decision location holds a NUL character", id="nul-location"),
    pytest.param("location", "x" * 201, "decision location is longer than 200 characters (201)", id="long-location"),
    pytest.param("current_activity", ["nap"], "decision current_activity is not text (list)", id="list-activity"),
    pytest.param("energy", "5", "decision energy is not a number (str)", id="text-energy"),
    pytest.param("energy", "", "decision energy is not a number (str)", id="empty-text-energy"),
    pytest.param("energy", [], "decision energy is not a number (list)", id="list-energy"),
    pytest.param("energy", None, "decision energy is not a number (NoneType)", id="null-energy"),
    pytest.param("energy", math.nan, "decision energy is not a finite number (nan)", id="nan-energy"),
    pytest.param("next_decision_at", 10**400, "decision next_decision_at is too large to be stored", id="huge"),
    pytest.param("state", {"note": "a\x00b"}, "decision state cannot be stored: note: NUL characters", id="nul-state"),
    pytest.param("state", {"n": ["\ud800"]}, "decision state cannot be stored: n.0: not valid Unicode", id="surrogate"),
    pytest.param("state", {"t": ("a\x00",)}, "decision state cannot be stored: t.0: NUL characters", id="nul-in-tuple"),
    # An int key sends the state through the standard library's encoder.
    pytest.param("state", {1: "x", "n": "\ud800"}, "decision state cannot be stored: n: not valid Unicode", id="json"),
]


async def _tick_spoiled(
    store: Store, bad_values: dict[str, object], fine_values: dict[str, object] | None = None
) -> tuple[TickResult | BaseException, TickResult | BaseException, int, int, int]:
    """Two worlds in one grouped commit; in the first, NPC "bad" (and "fine") decide what the plug-in sets."""

    def spoil(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        values = {"bad": bad_values, "fine": fine_values or {}}.get(npc.name or "", {})
        for field, value in values.items():
            setattr(decision, field, {**npc.state, **value} if isinstance(value, dict) else value)
        return decision

    bad_world = await store.create_world("bad", simulation={"alwaysOn": True})
    good_world = await store.create_world("good", simulation={"alwaysOn": True})
    fine, bad = await store.add_npcs(bad_world, [{"name": "fine"}, {"name": "bad"}])
    (good,) = await store.add_npcs(good_world, [{"name": "neighbour"}])
    sched = WorldScheduler(store, decide_fn=spoil)
    for world_id in (bad_world, good_world):
        await sched.register_world(world_id)
    first, second = await sched.tick_worlds([(bad_world, 60.0), (good_world, 60.0)])
    return first, second, fine, bad, good


@pytest.mark.parametrize(("field", "value", "message"), _UNWRITABLE)
async def test_a_plugin_value_neither_database_can_store_fails_its_world_naming_npc_and_column(
    store: Store, field: str, value: object, message: str
) -> None:
    """The same rules on both databases (PostgreSQL raised its own error naming nothing; SQLite stored most as is).

    The world's neighbour in the same grouped commit is not held back.
    """
    failed, committed, _, bad, good = await _tick_spoiled(store, {field: value})
    assert isinstance(failed, ValueError) and str(failed).startswith(f"npc {bad}: {message}"), failed
    assert not isinstance(committed, BaseException) and committed.npcs_simulated == 1, committed
    assert await _decisions(store, bad) == 0 and await _decisions(store, good) == 1
    assert await _state(store, bad) == {}


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        # Deeper than the API's 32 levels, with text the standard library escapes (an int key sends it there).
        pytest.param("state", {"deep": _deep(40), "e": "\U0001f600", 1: "x"}, None, id="deep-emoji-state"),
        pytest.param("state", {"path": "C:\\u0000", "deep": _deep(40)}, None, id="escaped-backslash-state"),
        pytest.param("current_activity", _Mood.NAP, "nap", id="str-enum-activity"),
        pytest.param("energy", 2**63, float(2**63), id="int-past-64-bits"),
        pytest.param("energy", True, 1.0, id="bool-energy"),
    ],
)
async def test_a_plugin_value_both_databases_can_store_is_written(
    store: Store, field: str, value: object, stored: object
) -> None:
    """No false refusals: what both databases store is written, the same on both."""
    first, second, _, bad, good = await _tick_spoiled(store, {field: value})
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException), (first, second)
    assert await _decisions(store, bad) == 1 and await _decisions(store, good) == 1
    if field == "state":
        assert await _state(store, bad) == json.loads(json.dumps(value))
    else:
        async with store.engine.connect() as conn:
            row = (await conn.execute(sa.select(npcs.c[field]).where(npcs.c.id == bad))).scalar_one()
        assert row == stored and type(row) is type(stored), row


async def test_ints_each_within_a_floats_range_are_written_though_their_sum_is_not(store: Store) -> None:
    first, _, fine, bad, _ = await _tick_spoiled(store, {"energy": 10**308}, {"energy": 10**308})
    assert not isinstance(first, BaseException), first
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(npcs.c.energy).where(npcs.c.id.in_([fine, bad])))).scalars().all()
    assert rows == [1e308, 1e308], rows


async def test_the_error_names_the_npc_at_fault_not_a_neighbour_with_unusual_but_valid_values(store: Store) -> None:
    failed, _, _, bad, _ = await _tick_spoiled(store, {"energy": math.nan}, {"current_activity": _Mood.NAP})
    assert isinstance(failed, ValueError) and str(failed).startswith(f"npc {bad}: decision energy is not a finite"), (
        failed
    )


async def test_a_plugin_state_with_a_non_finite_number_fails_its_world_not_written_as_null(store: Store) -> None:
    """JSON has no NaN: the state is refused naming the NPC, as before orjson, not silently stored as null."""

    def nan_state(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.state = {**npc.state, "score": math.nan, "limit": None}
        return decision

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "gambler", "state": {"score": 1.5}}])
    sched = WorldScheduler(store, decide_fn=nan_state)
    await sched.register_world(world_id)
    with pytest.raises(ValueError, match=f"npc {npc}: decision state cannot be written as JSON"):
        await sched.tick_world(world_id, 60.0)
    assert await _state(store, npc) == {"score": 1.5}
    assert await _decisions(store, npc) == 0


async def test_a_plugin_state_with_a_datetime_fails_its_world_not_stringified(store: Store) -> None:
    """A datetime is no JSON value: refused naming the NPC, as before orjson, not stored as a string."""
    from datetime import UTC, datetime

    def dated(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.state = {**npc.state, "seen": datetime(2026, 12, 6, tzinfo=UTC)}
        return decision

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    (npc,) = await store.add_npcs(world_id, [{"name": "clerk", "state": {"seen": None}}])
    sched = WorldScheduler(store, decide_fn=dated)
    await sched.register_world(world_id)
    with pytest.raises(ValueError, match=f"npc {npc}: decision state cannot be written as JSON"):
        await sched.tick_world(world_id, 60.0)
    assert await _state(store, npc) == {"seen": None}


async def test_a_decided_state_equal_only_by_python_numbers_is_written(store: Store) -> None:
    """``True == 1`` and ``1 == 1.0`` in Python, not in JSON: a state changing one into the other is written."""

    def flags(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.state = {**npc.state, "done": True, "ratio": 1.0}
        return decision

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    empty: dict[str, object] = {COOLDOWNS_KEY: {}}
    (npc,) = await store.add_npcs(world_id, [{"name": "n", "state": {**empty, "done": 1, "ratio": 1}}])
    read = await store.get_npcs(world_id)
    decisions = [flags(n, BehaviorContent(), 3600.0, 60.0) for n in read]
    assert decisions[0].state == read[0].state  # equal to Python, yet other JSON
    async with store.transaction() as conn:
        await store.write_decisions_many(conn, [(world_id, decisions)], [read])
    state = await _state(store, npc)
    assert isinstance(state, dict) and state["done"] is True and type(state["ratio"]) is float, state


async def test_one_npcs_state_does_not_change_how_a_neighbours_is_written(store: Store) -> None:
    """Each state is encoded as it would be alone: a null in one NPC's state never refuses another's UUID."""
    import uuid

    def plugin(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.state = {"id": uuid.UUID(int=5)} if npc.name == "a" else {"x": None}
        return decision

    world_id = await store.create_world("w", simulation={"alwaysOn": True})
    a, b = await store.add_npcs(world_id, [{"name": "a"}, {"name": "b"}])
    sched = WorldScheduler(store, decide_fn=plugin)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 60.0)
    assert await _state(store, a) == {"id": str(uuid.UUID(int=5))}
    assert await _state(store, b) == {"x": None}


@pytest.mark.postgres
async def test_a_grouped_write_too_large_for_one_jsonb_array_is_split_and_lands_whole(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the states document's size the write is split in halves, down to one state each: every row as decided."""
    from scheduler_daemon.store import ticks

    monkeypatch.setattr(ticks, "PG_STATES_DOCUMENT_BYTES", 1)

    def plugin(npc: NpcState, content: BehaviorContent, world_time: float, interval: float) -> NpcDecision:
        decision = decide(npc, content, world_time, interval)
        decision.state = None if npc.name.endswith("3") else {"n": npc.name, "t": world_time}
        return decision

    worlds = [await pg_store.create_world(f"w{i}", simulation={"alwaysOn": True}) for i in range(2)]
    ids = {w: await pg_store.add_npcs(w, [{"name": f"n{j}", "state": {"old": j}} for j in range(5)]) for w in worlds}
    sched = WorldScheduler(pg_store, decide_fn=plugin)
    for w in worlds:
        await sched.register_world(w)
    await sched.tick_worlds([(w, 60.0) for w in worlds])
    for w in worlds:
        for j, npc in enumerate(ids[w]):
            assert await _decisions(pg_store, npc) == 1
            expected = {"old": 3} if j == 3 else {"n": f"n{j}", "t": 3600.0}
            assert await _state(pg_store, npc) == expected
