"""Configuration reload in-process: whole-settings validation, the reload state, defaults that running worlds refuse.

The first test needs no database; it stays next to the second, which reloads
under a running world on each backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.daemon import Daemon
from scheduler_daemon.runtime import build_runtime
from scheduler_daemon.settings import load_settings
from scheduler_daemon.store.repository import Store
from tests.conftest import PG_ENV
from tests.support.helpers import make_world


@pytest.fixture(autouse=True)
def isolated_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SCHEDULER_* from the caller; logging restored after a reload reconfigured it."""
    for key in list(os.environ):
        if key.upper().startswith("SCHEDULER_") and key != PG_ENV:
            monkeypatch.delenv(key)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("sqlalchemy.engine", "aiosqlite", "asyncio")}
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.configure(**config)


GOOD = '[logging]\nlevel = "INFO"\nformat = "json"\n[database]\nurl = "sqlite:////tmp/a.db"\n'


async def test_failed_reload_keeps_settings_and_reports_until_a_good_one(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GOOD)
    daemon = Daemon(load_settings(path), path)
    running = daemon.settings
    started = daemon.get_stats()["config_reload"]
    # The configuration the daemon started with counts as loaded (metrics: 1, start time).
    assert started["last_successful"] is True and started["last_success_timestamp"] is not None

    for bad, reason in [
        ("[logging\n", "invalid TOML"),
        ('[logging]\nlevel = "DEBUG"\n[scheduler]\nmax_concurrent_ticks = 0\n', "scheduler.max_concurrent_ticks"),
        (None, "config file not found"),
    ]:
        if bad is None:
            path.unlink()
        else:
            path.write_text(bad)
        assert await daemon.reload() is False
        assert daemon.settings is running  # nothing half-applied
        state = daemon.get_stats()["config_reload"]
        assert state["last_successful"] is False
        assert state["last_error"].startswith(f"{path}: ") and reason in state["last_error"]
        assert state["last_success_timestamp"] == started["last_success_timestamp"]

    path.write_text(
        GOOD.replace('"INFO"', '"DEBUG"').replace("/tmp/a.db", "/tmp/b.db") + "[http]\nport = 1\nmax_connections = 7\n"
    )
    assert await daemon.reload() is True
    state = daemon.get_stats()["config_reload"]
    assert state == {
        "count": 4,
        "last_successful": True,
        "last_error": None,
        "last_success_timestamp": state["last_success_timestamp"],
        "restart_pending": ["database.url", "http.port", "http.max_connections"],
    }
    assert state["last_success_timestamp"] >= started["last_success_timestamp"]
    assert daemon.settings.logging.level == "DEBUG"  # reloadable: applied
    assert daemon.settings.database.url == running.database.url  # restart-only: kept as running
    assert daemon.settings.http.port == running.http.port
    assert daemon.settings.http.max_connections == running.http.max_connections


async def test_a_reload_keeps_the_arq_sink_settings_it_runs_with(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    arq = '[generation]\nsink = "scheduler_daemon.sinks.arq:enqueue"\n[generation.arq]\nqueue_name = "{}"\n'
    path.write_text(GOOD + arq.format("game:jobs"))
    daemon = Daemon(load_settings(path), path)
    path.write_text(GOOD + arq.format("other:jobs"))
    assert await daemon.reload() is True
    assert daemon.get_stats()["config_reload"]["restart_pending"] == ["generation.arq.queue_name"]
    assert daemon.settings.generation.arq.queue_name == "game:jobs"  # the sink was bound to it at start


async def test_reload_refuses_defaults_that_would_break_a_running_world(store: Store, tmp_path: Path) -> None:
    world_id, _ = await make_world(store, simulation={"tickIntervalSeconds": 5})
    path = tmp_path / "config.toml"
    path.write_text(GOOD)
    daemon = Daemon(load_settings(path), path)
    daemon.runtime = build_runtime(daemon.settings, store, VirtualClock())
    await daemon.runtime.runner.add_world(world_id)

    # Valid on its own, but the world's own tickIntervalSeconds (5) exceeds it.
    path.write_text(GOOD + "[defaults.simulation]\nmaxCatchUpSeconds = 2\n")
    assert await daemon.reload() is False
    error = daemon.get_stats()["config_reload"]["last_error"]
    assert error.startswith("defaults.simulation: would make running worlds invalid: ")
    assert f"world {world_id}" in error and "maxCatchUpSeconds" in error
    assert daemon.settings.defaults.simulation == {}
    assert daemon.runtime.scheduler.get_context(world_id).config.max_catch_up_seconds == 60

    path.write_text(GOOD + "[defaults.simulation]\ntimeScale = 120\n")
    assert await daemon.reload() is True
    assert daemon.runtime.scheduler.get_context(world_id).config.time_scale == 120
