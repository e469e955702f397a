"""``simulate``: the real tick pipeline fast-forwarded on a virtual clock, on both backends."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from scheduler_daemon.cli import main
from scheduler_daemon.demo import seed_demo
from scheduler_daemon.fastforward import FastForwardError, fast_forward
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.simulation.summary import UNDECIDED, SimulationSummary
from scheduler_daemon.store.models import metadata, npcs
from scheduler_daemon.store.repository import Store
from tests.conftest import make_store
from tests.support.helpers import world_state


async def demo_world(store: Store, key: str) -> int:
    await seed_demo(store)
    return next(w.id for w in await store.list_worlds() if w.meta.get("demo") == key)


async def all_rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    out = {}
    async with store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            query = sa.select(table).order_by(*table.primary_key.columns)
            out[table.name] = [tuple(r) for r in (await conn.execute(query)).all()]
    return out


async def decisions_by_npc(store: Store, world_id: int) -> dict[int, int]:
    async with store.engine.connect() as conn:
        query = sa.select(npcs.c.id, npcs.c.decisions).where(npcs.c.world_id == world_id)
        return {int(r[0]): int(r[1]) for r in (await conn.execute(query)).all()}


async def assert_summary_matches_database(
    store: Store, world_id: int, summary: SimulationSummary, before: dict[int, int], ticks: int
) -> None:
    world_time, committed_ticks = await world_state(store, world_id)
    assert world_time == pytest.approx(24 * 3600.0) and summary.end_world_time == world_time
    assert summary.ticks == committed_ticks == ticks
    async with store.engine.connect() as conn:
        query = sa.select(npcs.c.id, npcs.c.decisions, npcs.c.current_activity, npcs.c.energy, npcs.c.tier)
        rows = (await conn.execute(query.where(npcs.c.world_id == world_id))).all()
    decided = sum(r[1] - before[r[0]] for r in rows)
    assert decided == summary.decisions == sum(summary.decisions_per_tier.values()) > 0
    assert sum(n for per in summary.activities_per_hour.values() for n in per.values()) == summary.decisions
    assert summary.final_activities == Counter(r[2] or UNDECIDED for r in rows)
    assert (summary.final_energy.low, summary.final_energy.high) == (min(r[3] for r in rows), max(r[3] for r in rows))
    assert summary.tier_population == {t: sum(1 for r in rows if r[4] == t) for t in Tier}
    assert summary.npcs == len(rows)

    # A designer sees a day: sleep at night, work in the morning, leisure in the evening.
    def top(hour: int) -> str:
        return max(summary.activities_per_hour[hour].items(), key=lambda kv: kv[1])[0]

    assert top(4) == "sleep" and top(10) == "work" and top(20) in {"socialise", "eat", "wander"}
    report = summary.render()
    assert "Activities started per hour of day" in report and "(committed)" in report


async def test_24_game_hours_of_a_demo_world_and_the_summary_matches_the_database(store: Store) -> None:
    # Old Hollow: timeScale 3600, a tick every 2 s (2 game hours), no sessions:
    # 60 dormant NPCs and 20 frozen ones.
    world_id = await demo_world(store, "hollow")
    before = await decisions_by_npc(store, world_id)
    summary = await fast_forward(store, world_id, 24.0, dry_run=False)
    await assert_summary_matches_database(store, world_id, summary, before, ticks=12)
    assert summary.tier_population[Tier.FROZEN] == 20 and summary.decisions_per_tier.get(Tier.DORMANT, 0) > 0


async def test_24_game_hours_of_a_world_with_players_sqlite(tmp_path: Path) -> None:
    # Harbor Town: 288 ticks of 5 game minutes with a player, tier refreshes as
    # NPCs walk to and from her square. SQLite only, for the test-time budget:
    # the backends' parity is covered by the test above.
    store = await make_store("sqlite", tmp_path, None)  # type: ignore[arg-type]
    try:
        world_id = await demo_world(store, "harbor")
        before = await decisions_by_npc(store, world_id)
        summary = await fast_forward(store, world_id, 24.0, dry_run=False)
        await assert_summary_matches_database(store, world_id, summary, before, ticks=288)
        assert {Tier.DETAILED, Tier.ACTIVE, Tier.AMBIENT} <= set(summary.decisions_per_tier)
    finally:
        await store.dispose()


async def test_dry_run_leaves_every_row_unchanged(store: Store) -> None:
    world_id = await demo_world(store, "hollow")
    snapshot = await all_rows(store)
    summary = await fast_forward(store, world_id, 24.0, dry_run=True)
    assert summary.dry_run and summary.decisions > 0 and summary.ticks == 12
    assert summary.tier_population[Tier.FROZEN] == 20  # 80 NPCs, 60 dormant seats, no sessions
    assert summary.final_activities[UNDECIDED] == 20  # the frozen ones never decided
    assert await all_rows(store) == snapshot


async def test_committing_to_a_recently_ticked_world_needs_force(store: Store) -> None:
    world_id = await demo_world(store, "hollow")
    sched = WorldScheduler(store)
    await sched.register_world(world_id)
    await sched.tick_world(world_id, 1.0)  # as a running daemon would
    with pytest.raises(FastForwardError, match=rf"world {world_id} was ticked \d+s ago.*--dry-run"):
        await fast_forward(store, world_id, 2.0, dry_run=False)
    assert (await world_state(store, world_id))[1] == 1
    summary = await fast_forward(store, world_id, 2.0, dry_run=False, force=True)
    assert await world_state(store, world_id) == (pytest.approx(3600.0 + 7200.0), 2)
    assert summary.ticks == 1


async def test_paused_world_is_refused(store: Store) -> None:
    world_id = await store.create_world("p", simulation={"pauseSimulation": True})
    with pytest.raises(FastForwardError, match="paused"):
        await fast_forward(store, world_id, 1.0, dry_run=True)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging onto the captured stderr; undo that afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
async def test_cli_simulate_json_and_errors(
    store: Store, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world_id = await demo_world(store, "hollow")
    broken = await store.create_world("broken", meta={"behavior": {"activities": {"x": {"durationMinutes": [0, 1]}}}})
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", db_url)

    async def cli(*args: str) -> tuple[int, str, str]:
        try:
            code = await asyncio.to_thread(main, list(args))
        except SystemExit as exc:  # argparse rejects bad arguments this way
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("simulate", "--world", str(world_id), "--game-hours", "6", "--dry-run", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["dryRun"] is True and data["frozenNpcs"] == 20 and data["ticks"] == 3
    assert data["endWorldTime"] == pytest.approx(6 * 3600.0)

    code, _, err = await cli("simulate", "--world", "999", "--game-hours", "1", "--dry-run")
    assert code == 1 and "world 999 does not exist" in err
    code, _, err = await cli("simulate", "--world", str(broken), "--game-hours", "1")
    assert code == 2 and f"world {broken}: behavior.activities.x.durationMinutes" in err
    code, _, err = await cli("simulate", "--world", str(world_id), "--game-hours", "0")
    assert code == 2 and "positive" in err
