"""`scheduler-daemon jobs …` and `chains list` against real databases (in-process CLI)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from scheduler_daemon import chains, cli, generation
from scheduler_daemon.plugins import load_sink
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.store.repository import Store
from tests.conftest import TABLES_IN_DELETE_ORDER


async def _seed(url: str) -> tuple[int, int, int]:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        if store.dialect == "postgresql":
            async with store.transaction() as conn:
                await conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES_IN_DELETE_ORDER)} RESTART IDENTITY CASCADE"))
        world_id = await store.create_world("cli", simulation={"timeScale": 60})
        session = await store.add_session(world_id, "alice")
        claimed = await generation.create_request(store, world_id, session, "portrait", {"style": "ink"}, priority=2)
        pending = await generation.create_request(store, world_id, session, "voice", {})
        await chains.start_chain(store, world_id, [{"wait": 3600}, {"wait": 60}], chain_key="greet")
        sched = WorldScheduler(store, defaults={"maxJobOpsPerStep": 1})
        await sched.register_world(world_id)
        await sched.tick_world(world_id, 60.0)  # world time 3600: the chain's first step fires
        return world_id, claimed, pending
    finally:
        await store.dispose()


def test_jobs_list_complete_and_chains_list(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world_id, claimed, pending = asyncio.run(_seed(db_url))
    capsys.readouterr()  # drop the seeding's log lines
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", db_url)

    assert cli.main(["jobs", "list", "--world", str(world_id)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:6] == ["ID", "WORLD", "USER", "KIND", "PRIO", "STATUS"]
    assert out[1].split()[:6] == [str(claimed), str(world_id), "alice", "portrait", "2", "enqueued"]
    assert out[2].split()[:6] == [str(pending), str(world_id), "alice", "voice", "0", "pending"]

    assert cli.main(["jobs", "complete", str(claimed), "--status", "failed", "--error", "GPU on fire"]) == 0
    assert capsys.readouterr().out.strip() == f"generation request {claimed}: failed"
    assert cli.main(["jobs", "list", "--status", "failed", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["lastError"] == "GPU on fire"

    # Completing a request that is not in flight: one clear line, exit 1, no traceback.
    assert cli.main(["jobs", "complete", str(pending), "--status", "succeeded"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"scheduler-daemon: error: generation request {pending} is pending; cannot mark it succeeded"
    )
    assert cli.main(["jobs", "complete", "999999", "--status", "succeeded"]) == 1
    assert "generation request 999999 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["jobs", "complete", str(pending), "--status", "done"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'done'" in capsys.readouterr().err

    assert cli.main(["chains", "list", "--world", str(world_id)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["1", str(world_id), "greet", "active", "1/2", "day", "1", "Mon", "01:01"]


def test_generation_settings_and_sink_loading(tmp_path: Path) -> None:
    from scheduler_daemon.settings import SettingsError, load_settings

    path = tmp_path / "config.toml"
    path.write_text('[generation]\nsink = "tests.support.sinks:recording_sink"\nsink_timeout_seconds = 2.5\n')
    settings = load_settings(path)
    assert settings.generation.sink_timeout_seconds == 2.5
    assert load_sink(settings.generation.sink).__name__ == "recording_sink"
    assert settings.hand_off_timeout_seconds == 2.5
    # A short tick timeout alone stays valid; the hand-off then gets half of it.
    path.write_text("[scheduler]\ntick_timeout_seconds = 2\n")
    assert load_settings(path).hand_off_timeout_seconds == 1.0
    path.write_text("[generation]\nsink_timeout_seconds = 0\n")
    with pytest.raises(SettingsError, match=r"generation\.sink_timeout_seconds: Input should be greater than 0"):
        load_settings(path)
    for spec, message in (
        ("nocolon", "expected 'package.module:callable'"),
        ("tests.no_such_module:f", "module 'tests.no_such_module' not found"),
        ("tests.support.sinks:missing", "'tests.support.sinks' has no attribute 'missing'"),
        ("tests.support.sinks:os", "'os' is not callable"),
    ):
        with pytest.raises(ValueError, match=message):
            load_sink(spec)


def test_the_old_default_sink_spec_loads_the_renamed_sink_with_a_deprecation_warning(tmp_path: Path) -> None:
    from scheduler_daemon.plugins import Plugins
    from scheduler_daemon.settings import load_settings

    # As copied from the example config of earlier versions, before jobs.py became generation.py.
    path = tmp_path / "config.toml"
    path.write_text('[generation]\nsink = "scheduler_daemon.jobs:leave_enqueued"\n')
    with capture_logs() as logs:
        plugins = Plugins.from_settings(load_settings(path))
    assert plugins.sink is generation.leave_enqueued
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["deprecated"], e["replacement"]) for e in warnings] == [
        ("scheduler_daemon.jobs:leave_enqueued", "scheduler_daemon.generation:leave_enqueued")
    ]
    assert warnings[0]["event"] == "sink_module_renamed"
    # The current spec loads the same sink without a warning.
    with capture_logs() as logs:
        assert load_sink("scheduler_daemon.generation:leave_enqueued") is generation.leave_enqueued
    assert logs == []
