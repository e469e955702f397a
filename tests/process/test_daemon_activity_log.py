"""The real daemon shows NPCs changing activities: the periodic ``world activity`` line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler_daemon.demo import seed_demo
from scheduler_daemon.store.repository import Store
from tests.process.test_daemon_world_time import ROOT, poll

pytestmark = pytest.mark.subprocess


async def seed(url: str) -> None:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        await seed_demo(store)
    finally:
        await store.dispose()


def test_daemon_logs_what_the_npcs_of_each_world_are_doing(tmp_path: Path) -> None:
    # SQLite only: this checks the daemon's logging, not a backend.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.update(
        SCHEDULER_DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}",
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_LOGGING__ACTIVITY_SUMMARY_SECONDS="0.5",
        SCHEDULER_HTTP__ENABLED="false",
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.5",
        PYTHONPATH=str(ROOT),
    )
    asyncio.run(seed(env["SCHEDULER_DATABASE__URL"]))  # in-process: two interpreter starts fewer
    log_path = tmp_path / "daemon.log"

    def activity_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("event") == "world_activity"]

    def changed_for_hollow() -> list[dict[str, Any]] | None:
        hollow = [e for e in activity_lines() if e["world_id"] == 3]
        doing = {json.dumps(e["doing"], sort_keys=True) for e in hollow}
        return hollow if len(doing) >= 2 else None

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "run"], env=env, stderr=log, stdout=log, cwd=ROOT
        )
        try:
            # Old Hollow runs 2 game hours per 2 s tick: its NPCs wake, eat, work.
            hollow = poll(changed_for_hollow, timeout=30, interval=0.2, what="Old Hollow's activities to change")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0
    last = hollow[-1]
    assert last["world_time"].startswith("day ") and last["frozen"] == 20
    assert sum(last["doing"].values()) == 80 and last["tiers"]["dormant"] == 60
    assert {e["world_id"] for e in activity_lines()} == {1, 2, 3}
    assert {e["logger"] for e in activity_lines()} == {"scheduler_daemon.daemon"}
