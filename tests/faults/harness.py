"""Fault-injection harness: the real daemon as a subprocess, its own database, bounded polls.

Everything here acts at real boundaries: a subprocess started with the
``scheduler-daemon run`` entry point, signals, ``pg_terminate_backend``, a
private PostgreSQL cluster started with ``initdb``/``pg_ctl``. Nothing of the
daemon is mocked. Every process started here is killed in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from scheduler_daemon.generation import create_request
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.models import world_states, worlds
from scheduler_daemon.store.repository import Store
from tests.conftest import libpq
from tests.support.helpers import add_npcs_in_tiers, tier_capacities_for

ROOT = Path(__file__).resolve().parents[2]
APPLICATION_NAME = "scheduler-daemon"  # set by store/database.py on every PostgreSQL session

T = TypeVar("T")

#: Log events after which the daemon may hand a world's claimed requests out again.
HANDOFF_INTERRUPTIONS = frozenset({"generation_handoff_interrupted", "tick_timed_out"})


# --------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Profile:
    """How hard the suite pushes: ``ci`` for ``make test``, ``soak`` for ``make soak``.

    Override single values with ``SCHEDULER_FAULTS_<NAME>`` (e.g.
    ``SCHEDULER_FAULTS_SIGKILL_ITERATIONS=20``).
    """

    name: str
    sigkill_iterations: int
    connection_kills: int
    outage_seconds: float
    soak_minutes: float
    schemathesis_examples: int
    load_worlds: int = 5000
    load_rate: float = 200.0  # config changes per second through the admin API
    load_seconds: float = 25.0  # length of the burst
    grouped_write_kills: int = 9  # sessions killed inside a grouped tick's write or COMMIT


_PROFILES = {
    # make test: CI runs the whole suite in one 30-minute budget (the fault suite alone after the
    # rest, about 10 minutes); make soak has the strength.
    "ci": Profile(
        "ci", sigkill_iterations=8, connection_kills=8, outage_seconds=10.0, soak_minutes=0.0, schemathesis_examples=10
    ),
    "soak": Profile(
        "soak",
        sigkill_iterations=20,
        connection_kills=40,
        outage_seconds=30.0,
        soak_minutes=30.0,
        schemathesis_examples=200,
        load_seconds=300.0,
        grouped_write_kills=60,
    ),
}


def profile() -> Profile:
    base = _PROFILES[os.environ.get("SCHEDULER_FAULTS_PROFILE", "ci")]
    overrides: dict[str, Any] = {}
    for name, kind in (
        ("sigkill_iterations", int),
        ("connection_kills", int),
        ("outage_seconds", float),
        ("soak_minutes", float),
        ("schemathesis_examples", int),
        ("load_worlds", int),
        ("load_rate", float),
        ("load_seconds", float),
        ("grouped_write_kills", int),
    ):
        raw = os.environ.get(f"SCHEDULER_FAULTS_{name.upper()}")
        if raw:
            overrides[name] = kind(raw)
    return Profile(**{**base.__dict__, **overrides})


def record_result(fault: str, **figures: Any) -> None:
    """Append one line of figures to ``$SCHEDULER_FAULTS_REPORT`` (for the closing table)."""
    path = os.environ.get("SCHEDULER_FAULTS_REPORT")
    if path:
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"fault": fault, "profile": profile().name, **figures}, default=str) + "\n")


# ----------------------------------------------------------------- polling
def poll(predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Bounded polling: the first truthy value of ``predicate``, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- database
def sync_url(url: str) -> str:
    """The synchronous driver URL for the test process (same database as the daemon)."""
    return url.replace("sqlite+aiosqlite", "sqlite")


@dataclass
class FaultDatabase:
    """A database of its own for one fault test, migrated, with a sync engine for checks."""

    url: str  # the daemon's URL (async driver)
    backend: str
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(sync_url(self.url), poolclass=sa.pool.NullPool)

    @property
    def name(self) -> str:
        return str(make_url(self.url).database)

    def run(self, coro_fn: Callable[[Store], Any]) -> Any:
        """Run ``await coro_fn(store)`` against this database (seeding, migrations)."""

        async def main() -> Any:
            store = Store.from_url(self.url)
            try:
                return await coro_fn(store)
            finally:
                await store.dispose()

        return asyncio.run(main())

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.execute(sa.text(sql), dict(params or {}))
            return list(result.all()) if result.returns_rows else []

    def world_state(self, world_id: int) -> tuple[float, int]:
        row = self.execute("SELECT world_time, ticks FROM world_states WHERE world_id = :w", {"w": world_id})[0]
        return float(row[0]), int(row[1])

    def ticks(self) -> dict[int, int]:
        return {int(r[0]): int(r[1]) for r in self.execute("SELECT world_id, ticks FROM world_states")}

    def dispose(self) -> None:
        self.engine.dispose()


def kill_daemon_sessions(db: FaultDatabase) -> int:
    """``pg_terminate_backend`` every session the daemon holds on this database; returns how many."""
    rows = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :app AND datname = :db",
        {"app": APPLICATION_NAME, "db": db.name},
    )
    return sum(1 for r in rows if r[0])


# ------------------------------------------------------------------ worlds
def seed_worlds(
    db: FaultDatabase,
    count: int,
    *,
    simulation: Mapping[str, Any],
    npcs_per_tier: Mapping[Tier, int] | None = None,
    name: str = "fault",
) -> list[int]:
    """``count`` always-on worlds with NPCs due at world time 0.

    The daemon assigns tiers from sessions, so each world gets a session that
    puts its NPCs into the requested tiers (see ``add_npcs_in_tiers``).
    """
    counts = dict(npcs_per_tier or {})

    async def seed(store: Store) -> list[int]:
        ids = []
        for i in range(count):
            sim = {"alwaysOn": True, **simulation}
            if counts and "tiers" not in sim:
                sim["tiers"] = tier_capacities_for(counts)
            world_id = await store.create_world(f"{name}-{i}", simulation=sim)
            await add_npcs_in_tiers(store, world_id, counts)
            ids.append(world_id)
        return ids

    return list(db.run(seed))


def seed_requests(db: FaultDatabase, worlds: list[int], per_world: int, *, kind: str = "fault") -> list[int]:
    """``per_world`` pending generation requests in each world, for its first session's user."""

    async def seed(store: Store) -> list[int]:
        ids = []
        for world_id in worlds:
            session_id = int(db.execute("SELECT min(id) FROM sessions WHERE world_id = :w", {"w": world_id})[0][0])
            for i in range(per_world):
                ids.append(await create_request(store, world_id, session_id, kind, {"n": i}))
        return ids

    return list(db.run(seed))


def requests_settled(db: FaultDatabase) -> bool:
    """Every generation request is claimed and handed off (nothing pending, nothing left in the outbox)."""
    rows = db.execute(
        "SELECT count(*) FROM generation_requests WHERE status = 'pending' OR (status = 'enqueued' AND NOT handed_off)"
    )
    return int(rows[0][0]) == 0


def seed_many_worlds(db: FaultDatabase, simulations: Sequence[Mapping[str, Any]], *, name: str = "load") -> list[int]:
    """One always-on world without NPCs per entry of ``simulations``, set-based.

    Two multi-row INSERTs (``worlds`` with ``RETURNING``, then ``world_states``)
    instead of a transaction per world: thousands of worlds seed in about a second.
    """
    rows = [
        {"name": f"{name}-{i}", "meta": {"simulation": {"alwaysOn": True, **sim}}} for i, sim in enumerate(simulations)
    ]
    with db.engine.begin() as conn:
        ids = [
            int(i)
            for i in conn.execute(
                sa.insert(worlds).returning(worlds.c.id, sort_by_parameter_order=True), rows
            ).scalars()
        ]
        conn.execute(sa.insert(world_states), [{"world_id": i} for i in ids])
    return ids


# ------------------------------------------------------------------ daemon
def write_config(
    path: Path,
    *,
    scheduler: Mapping[str, Any] | None = None,
    extra: str = "",
    http: Mapping[str, Any] | None = None,
    recording_sink: bool = False,
) -> Path:
    """A daemon config file: JSON logs, fast discovery, the fault plug-in.

    HTTP is off unless ``http`` gives its settings (e.g. ``{"port": 0}``; the
    bound port is in the ``http server listening`` log line, see
    :meth:`DaemonProcess.http_port`). ``recording_sink`` hands generation
    requests to ``tests.faults.plugins:recording_sink`` (``$FAULT_SINK_FILE``).
    """
    sched = {
        "discovery_interval_seconds": 0.5,
        "tick_timeout_seconds": 2.0,
        "behavior": "tests.faults.plugins:decide",
        **(scheduler or {}),
    }
    lines = ["[scheduler]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in sched.items()]
    lines += [
        "",
        "[logging]",
        'format = "json"',
        f'level = "{os.environ.get("SCHEDULER_FAULTS_LOG_LEVEL", "INFO")}"',
        "",
        "[http]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in http.items()] if http is not None else ["enabled = false"]
    lines.append("")
    if recording_sink:
        lines += ["[generation]", 'sink = "tests.faults.plugins:recording_sink"', ""]
    path.write_text("\n".join(lines) + extra, encoding="utf-8")
    return path


def daemon_env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.update(SCHEDULER_DATABASE__URL=db_url, PYTHONPATH=str(ROOT), **extra)
    return env


class DaemonProcess:
    """One ``scheduler-daemon run`` subprocess; stderr (JSON log lines) goes to a file.

    ``open_files_limit`` sets the subprocess's RLIMIT_NOFILE soft and hard
    limit before it starts (so the daemon cannot raise it).
    """

    def __init__(
        self, config: Path, env: Mapping[str, str], log_path: Path, *, open_files_limit: int | None = None
    ) -> None:
        self.config = config
        self.env = dict(env)
        self.log_path = log_path
        self.open_files_limit = open_files_limit
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: datetime | None = None  # wall time of the spawn
        self.stopped_at: datetime | None = None

    def start(self) -> DaemonProcess:
        self.started_at = utcnow()
        limit = self.open_files_limit

        def limit_open_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler_daemon", "--config", str(self.config), "run"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
                preexec_fn=limit_open_files if limit is not None else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL now (no cleanup in the daemon)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.stopped_at = self.stopped_at or utcnow()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL if it does not stop in time)."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                pytest.fail(f"daemon did not stop within {timeout}s of SIGTERM")
        self.stopped_at = self.stopped_at or utcnow()
        return int(self.proc.returncode)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (non-JSON lines are kept as ``{"raw": ...}``)."""
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"raw": raw}
            out.append(line if isinstance(line, dict) else {"raw": raw})
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == event]

    def handoffs_interrupted(self) -> list[tuple[int, datetime]]:
        """``(world_id, when)`` of every generation hand-off (or tick around it) cut short.

        A request of such a world may be handed out again (at least once):
        the bookkeeping of its earlier hand-off did not commit.
        """
        return [
            (int(line["world_id"]), datetime.fromisoformat(str(line["timestamp"])))
            for line in self.log_lines()
            if line.get("event") in HANDOFF_INTERRUPTIONS and "world_id" in line and "timestamp" in line
        ]

    def http_port(self, timeout: float = 60.0) -> int:
        """The port the daemon's HTTP server bound (it logs it before READY=1)."""
        line = poll(lambda: self.events("http_listening"), timeout=timeout, what="the HTTP port")[0]
        return int(line["port"])

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def running_daemon(
    config: Path, env: Mapping[str, str], log_path: Path, *, open_files_limit: int | None = None
) -> Iterator[DaemonProcess]:
    """Start the daemon; always killed on the way out (SIGTERM first if still running)."""
    daemon = DaemonProcess(config, env, log_path, open_files_limit=open_files_limit).start()
    try:
        yield daemon
    finally:
        if daemon.alive():
            try:
                daemon.stop(timeout=20)
            finally:
                daemon.kill()


def wait_for_ticks(db: FaultDatabase, worlds: list[int], at_least: int, *, timeout: float, what: str = "") -> None:
    """Every world in ``worlds`` reaches ``at_least`` committed ticks."""
    poll(
        lambda: all(db.ticks().get(w, 0) >= at_least for w in worlds),
        timeout=timeout,
        interval=0.1,
        what=what or f"worlds {worlds} to reach {at_least} ticks",
    )


def wait_for_progress(db: FaultDatabase, worlds: list[int], *, timeout: float, what: str = "") -> float:
    """Every world commits at least one more tick; returns the seconds it took."""
    start = time.monotonic()
    before = db.ticks()
    poll(
        lambda: all(db.ticks().get(w, 0) > before.get(w, 0) for w in worlds),
        timeout=timeout,
        interval=0.05,
        what=what or f"worlds {worlds} to tick again",
    )
    return time.monotonic() - start


# ------------------------------------------------------ private PostgreSQL
def _pg_bindir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if candidates:
        return candidates[0].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, stopped and started by the test.

    ``initdb`` refuses to run as root, so as root the cluster runs as the
    ``postgres`` system user (``runuser``) in a temporary directory it owns.
    """

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("no initdb/pg_ctl found (install the postgresql server package)")
        self.bindir = bindir
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="sched-fault-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root and runuser is missing: cannot run initdb as postgres")
            try:
                import pwd

                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run initdb as") from None
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")

    def init(self) -> PrivatePostgres:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-o", opts, "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash: no checkpoint, the server recovers from WAL on start."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------- slow transactions
def install_slow_ticks(db: FaultDatabase, *, world_id: int | None = None, seconds: float = 0.05) -> None:
    """Make each tick's final UPDATE of ``world_states`` slow, inside the tick's transaction.

    Keeps the daemon inside an open tick transaction (NPC rows already
    written, clock not yet committed) most of the time, so a kill or a
    dropped connection lands mid-tick. PostgreSQL sleeps (``pg_sleep``, so
    only that transaction waits; with ``world_id`` only that world); SQLite
    has no sleep, so its trigger burns CPU for roughly the same time instead.
    """
    where = f"OLD.world_id = {int(world_id)}" if world_id is not None else "true"
    with db.engine.begin() as conn:
        if db.backend == "postgres":
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION fault_slow_tick_fn() RETURNS trigger AS $$ "
                f"BEGIN PERFORM pg_sleep({float(seconds)}); RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER fault_slow_tick BEFORE UPDATE ON world_states FOR EACH ROW "
                f"WHEN ({where}) EXECUTE FUNCTION fault_slow_tick_fn()"
            )
        else:
            blob = max(1, int(seconds * 20_000_000))  # hex() of a random blob: roughly 1 s per 20 MB
            conn.exec_driver_sql(
                f"CREATE TRIGGER fault_slow_tick BEFORE UPDATE ON world_states WHEN {where} "
                f"BEGIN SELECT length(hex(randomblob({blob}))); END"
            )


def drop_slow_ticks(db: FaultDatabase) -> None:
    with db.engine.begin() as conn:
        if db.backend == "postgres":
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS fault_slow_tick ON world_states")
        else:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS fault_slow_tick")


def pg_block_connections(db: FaultDatabase, blocked: bool) -> int:
    """Make the database refuse (``ALLOW_CONNECTIONS false``) or accept new connections.

    Blocking also terminates the daemon's sessions, so the database is
    unreachable for it until unblocked. Runs from the server's ``postgres``
    database (this one refuses the test too meanwhile). Returns the sessions killed.
    """
    with psycopg.connect(libpq(db.url.rsplit("/", 1)[0] + "/postgres"), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS {"false" if blocked else "true"}')
        if not blocked:
            return 0
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            (APPLICATION_NAME, db.name),
        ).fetchall()
    return sum(1 for r in rows if r[0])


def pg_keep_test_sessions_writable(db: FaultDatabase) -> None:
    """The test's own sessions on ``db`` ignore a database-wide ``default_transaction_read_only``.

    A connection option (``-c``) outranks ``ALTER DATABASE … SET``, so the
    checks, the kills and the reset keep working while the daemon's new
    sessions start read-only.
    """
    db.engine.dispose()
    db.engine = sa.create_engine(
        sync_url(db.url),
        poolclass=sa.pool.NullPool,
        connect_args={"options": "-c default_transaction_read_only=off"},
    )


def pg_set_default_read_only(db: FaultDatabase, read_only: bool) -> None:
    """``ALTER DATABASE … SET default_transaction_read_only = on`` or ``RESET`` it.

    What sessions on a demoted primary look like: every transaction they start
    is read-only. Sessions already open keep the value they started with.
    """
    if read_only:
        db.execute(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
    else:
        db.execute(f'ALTER DATABASE "{db.name}" RESET default_transaction_read_only')


def pg_daemon_in_transaction(db: FaultDatabase) -> bool:
    """Whether one of the daemon's sessions is inside an open transaction right now."""
    rows = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND datname = :db "
        "AND xact_start IS NOT NULL",
        {"app": APPLICATION_NAME, "db": db.name},
    )
    return bool(rows[0][0])
