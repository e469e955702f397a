"""The three ``examples/`` scripts run for real against SQLite and PostgreSQL.

Each database is migrated with ``scheduler-daemon db upgrade`` and seeded
through the Store API (a world with NPCs and a player's session); the tests
then watch world time and ticks move in the database, with bounded polling.
Between two ticks of one runner a world advances by exactly the real time
between their ``last_advanced_at`` stamps × ``timeScale``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.process.test_daemon_world_time import ROOT, poll
from tests.support.seeding import WorldStates, migrate, process_env, seed_world

pytestmark = pytest.mark.subprocess

SCALE = 60.0
REDIS_URL = "redis://127.0.0.1:6379"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def world(db_url: str) -> Iterator[tuple[int, WorldStates]]:
    migrate(db_url)
    world_id = seed_world(db_url, simulation={"timeScale": SCALE})
    states = WorldStates(db_url)
    try:
        yield world_id, states
    finally:
        states.close()


def run(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def finish(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> int:
    """Signal the process and wait for it (killed if it does not stop in time)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def assert_tracks_real_time(states: WorldStates, world_id: int, *, exact: bool) -> None:
    """Two later ticks: world time moved forwards by the real time between their stamps × timeScale.

    ``exact``: one long-lived runner (each tick covers the time since the
    previous); else a new runner per call, each covering at most one interval.
    """
    first, first_at = states(world_id), states.stamp(world_id)
    second = poll(lambda: (s := states(world_id))[1] >= first[1] + 2 and s, timeout=60, what="two more ticks")
    second_at = states.stamp(world_id)
    assert first_at is not None and second_at is not None
    real = (second_at - first_at).total_seconds()
    assert second[0] > first[0]
    if exact:
        assert second[0] - first[0] == pytest.approx(SCALE * real, abs=SCALE * 0.01)
    else:
        # Each tick's time comes from the monotonic clock, its stamp from the wall clock read next to it.
        assert second[0] - first[0] <= SCALE * (real + 0.001)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dedicated_worker_runs_the_worlds_and_stops_cleanly(
    world: tuple[int, WorldStates], db_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    world_id, states = world
    log = tmp_path / "worker.log"
    proc = run([sys.executable, "examples/dedicated_worker.py"], process_env(db_url), log)
    try:
        poll(lambda: states(world_id)[1] >= 2, timeout=60, what="the worker's first ticks")
        assert_tracks_real_time(states, world_id, exact=True)
    finally:
        code = finish(proc, sig)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "scheduler_loop_stopped" in out and "worker stopped" in out
    assert "Traceback" not in out


def test_fastapi_lifespan_runs_the_worlds_and_serves_their_stats(
    world: tuple[int, WorldStates], db_url: str, tmp_path: Path
) -> None:
    world_id, states = world
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "uvicorn.log"
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_lifespan:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = run(args, process_env(db_url), log)
    try:

        def stats() -> dict[str, Any] | None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/worlds/{world_id}/stats", timeout=5)
            except httpx.TransportError:
                return None  # not listening yet
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body if body["ticks_processed"] >= 2 else None

        served = poll(stats, timeout=60, what="the app's stats of a ticking world")
        assert served["world_id"] == world_id and served["npcs_simulated_total"] > 0
        assert states(world_id)[0] >= served["current_world_time"] > 0
        assert httpx.get(f"http://127.0.0.1:{port}/worlds/999/stats", timeout=5).status_code == 404
        assert_tracks_real_time(states, world_id, exact=True)
    finally:
        code = finish(proc)
    out = log.read_text()
    # uvicorn exits by re-raising the signal once its shutdown (the lifespan's exit) is complete.
    assert code in (0, -signal.SIGTERM), out[-3000:]
    assert "Application shutdown complete" in out
    # uvicorn configures its own loggers only: the scheduler's INFO lines stay quiet (logging is the host's).
    assert "scheduler_loop_stopped" not in out
    assert "Traceback" not in out


def require_arq_and_redis() -> None:
    """Skip without arq or Redis on a laptop; under CI=true that is a failure."""
    try:
        import arq  # noqa: F401
        import redis
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"arq must be installed in CI: {exc}")
        pytest.skip(f"needs arq: {exc}")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if in_ci():
            pytest.fail(f"Redis at {REDIS_URL} is unreachable in CI: {exc}")
        pytest.skip(f"needs Redis at {REDIS_URL}: {exc}")


def start_cron_worker(db_url: str, tmp_path: Path) -> tuple[subprocess.Popen[str], str, Path]:
    """``arq examples.arq_cron.WorkerSettings`` on a queue of its own; returns the process, the queue and its log."""
    queue = f"scheduler-daemon-test:{uuid.uuid4().hex[:8]}"
    env = process_env(db_url, ARQ_REDIS_URL=REDIS_URL, ARQ_QUEUE_NAME=queue)
    log = tmp_path / "arq.log"
    return run([sys.executable, "-m", "arq", "examples.arq_cron.WorkerSettings"], env, log), queue, log


def drop_queue_keys(queue: str) -> None:
    """The queue, its health check, and the cron jobs' keys and results (``arq:job:<queue>…``)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    leftovers = list(client.scan_iter(match=f"*{queue}*"))
    if leftovers:
        client.delete(*leftovers)
    client.close()


async def test_arq_cron_job_called_as_cron_would_advances_the_clock_each_time(
    world: tuple[int, WorldStates], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_arq_and_redis()
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", db_url)
    from examples.arq_cron import shutdown, startup, tick_all_worlds

    world_id, states = world
    ctx: dict[str, Any] = {}
    await startup(ctx)
    try:
        first = await tick_all_worlds(ctx)
        assert first["ticked_worlds"] == 1 and first["failed"] == 0
        assert first["stats"]["worlds"][world_id]["ticks_processed"] == 1
        after_first, first_at = states(world_id), states.stamp(world_id)
        assert after_first[1] == 1 and after_first[0] >= SCALE  # never ticked: one interval
        second = await tick_all_worlds(ctx)
        assert second["ticked_worlds"] == 1
        after_second, second_at = states(world_id), states.stamp(world_id)
        assert first_at is not None and second_at is not None
        # A new scheduler and runner: the tick covers the real time since the first one, never a second twice.
        assert after_second[1] == 2 and after_second[0] > after_first[0]
        assert after_second[0] - after_first[0] == pytest.approx(
            SCALE * (second_at - first_at).total_seconds(), abs=SCALE * 0.01
        )
    finally:
        await shutdown(ctx)


def test_arq_worker_runs_the_cron_job_every_second(world: tuple[int, WorldStates], db_url: str, tmp_path: Path) -> None:
    require_arq_and_redis()

    world_id, states = world
    proc, queue, log = start_cron_worker(db_url, tmp_path)
    try:
        poll(lambda: proc.poll() is None and states(world_id)[1] >= 2, timeout=60, what="the cron job's ticks")
        assert_tracks_real_time(states, world_id, exact=False)
    finally:
        code = finish(proc)
        drop_queue_keys(queue)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "tick_all_worlds" in out and "Traceback" not in out


#: How long the hung tick of the stop test blocks in the database (its trigger's pg_sleep).
HANG_SECONDS = 3


@pytest.mark.postgres
def test_a_stop_signal_during_a_cron_tick_lets_the_tick_commit_and_exits_0(pg_scratch_url: str, tmp_path: Path) -> None:
    """SIGTERM while ``tick_all_worlds`` runs: the tick finishes and commits, the worker exits 0.

    The world's clock move blocks in a trigger (``pg_sleep``), so the signal
    lands inside a tick every time, not by chance.
    """
    require_arq_and_redis()
    import sqlalchemy as sa

    migrate(pg_scratch_url)
    world_id = seed_world(pg_scratch_url, simulation={"timeScale": SCALE})
    states = WorldStates(pg_scratch_url)
    engine = sa.create_engine(pg_scratch_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION hang_fn() RETURNS trigger AS $$ "
            f"BEGIN PERFORM pg_sleep({HANG_SECONDS}); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER hang BEFORE UPDATE ON world_states FOR EACH ROW EXECUTE FUNCTION hang_fn()"
        )

    def sleeping_in_the_trigger() -> bool:
        with engine.connect() as conn:
            return bool(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event = 'PgSleep' AND query ILIKE '%%world_states%%'"
                ).scalar_one()
            )

    proc, queue, log = start_cron_worker(pg_scratch_url, tmp_path)
    try:
        poll(lambda: proc.poll() is None and sleeping_in_the_trigger(), timeout=60, what="a tick inside the trigger")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=HANG_SECONDS + 30)
        ticks = states(world_id)[1]
    finally:
        finish(proc)
        states.close()
        engine.dispose()
        drop_queue_keys(queue)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    assert ticks == 1, "the tick the signal interrupted must commit"
