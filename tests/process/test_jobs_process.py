"""The real daemon killed with SIGKILL between a tick's commit and the hand-off: no request is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scheduler_daemon import generation
from scheduler_daemon.store.repository import Store
from tests.conftest import TABLES_IN_DELETE_ORDER
from tests.process.test_daemon_world_time import ROOT, poll, sync_url

pytestmark = pytest.mark.subprocess


async def _seed(url: str) -> tuple[int, int]:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        if store.dialect == "postgresql":
            async with store.transaction() as conn:
                await conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES_IN_DELETE_ORDER)} RESTART IDENTITY CASCADE"))
        world_id = await store.create_world("crash", simulation={"timeScale": 60, "tickIntervalSeconds": 0.2})
        session = await store.add_session(world_id, "alice")
        request_id = await generation.create_request(store, world_id, session, "portrait", {"style": "oil"})
        return world_id, request_id
    finally:
        await store.dispose()


def _start(env: dict[str, str], sink: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", "run"],
            env={**env, "SCHEDULER_GENERATION__SINK": sink},
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)


def test_crash_between_commit_and_hand_off_hands_the_request_out_again(db_url: str, tmp_path: Path) -> None:
    _world_id, request_id = asyncio.run(_seed(db_url))
    marker, record, log = tmp_path / "marker", tmp_path / "record", tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.update(
        SCHEDULER_DATABASE__URL=db_url,
        SCHEDULER_LOGGING__FORMAT="json",
        SCHEDULER_HTTP__ENABLED="false",
        SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS="0.2",
        SCHEDULER_SCHEDULER__TICK_TIMEOUT_SECONDS="120",
        SCHEDULER_GENERATION__SINK_TIMEOUT_SECONDS="60",
        SINK_MARKER_FILE=str(marker),
        SINK_RECORD_FILE=str(record),
        PYTHONPATH=str(ROOT),
    )
    engine = sa.create_engine(sync_url(db_url))

    def row() -> Any:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT status, handed_off, attempts FROM generation_requests WHERE id = :id"),
                {"id": request_id},
            ).one()

    try:
        # Run 1: the sink is entered (the claim has committed) and never returns; kill -9 right there.
        first = _start(env, "tests.support.sinks:blocking_sink", log)
        try:
            poll(lambda: marker.exists() and marker.read_text().strip(), timeout=30, what="the sink to be called")
            _stop(first, signal.SIGKILL)
        finally:
            _stop(first, signal.SIGKILL)
        assert marker.read_text().split() == [str(request_id), f"generation-request-{request_id}"]
        status, handed_off, attempts = row()
        assert (status, bool(handed_off), attempts) == ("enqueued", False, 0)  # committed claim, still in the outbox

        # Run 2: a restarted daemon hands the same request out again, with the same idempotency key.
        second = _start(env, "tests.support.sinks:recording_sink", log)
        try:
            poll(lambda: bool(row()[1]), timeout=30, what="the request to be handed off after the restart")
        finally:
            _stop(second, signal.SIGTERM)
        assert second.returncode == 0, log.read_text()[-3000:]
        assert record.read_text().splitlines() == [f"{request_id} generation-request-{request_id}"]
        assert row()[0] == "enqueued"
    finally:
        engine.dispose()
