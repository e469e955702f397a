"""Several real daemons on one PostgreSQL database (multi-daemon tests, failover bench).

Every committed tick is recorded by a database trigger (``tick_audit``: world,
tick number, lease owner and epoch, world time, the database's clock); every
daemon reports the ticks it believes it committed as JSON ``tick`` log lines
(DEBUG). Comparing the two is how the tests prove that each tick was applied
exactly once and by its lease owner.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

AUDIT_SQL = """
CREATE TABLE tick_audit (
    id bigserial PRIMARY KEY,
    world_id integer NOT NULL,
    ticks bigint NOT NULL,
    world_time double precision NOT NULL,
    lease_owner text,
    lease_epoch bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION tick_audit_fn() RETURNS trigger AS $$
BEGIN
    INSERT INTO tick_audit (world_id, ticks, world_time, lease_owner, lease_epoch)
    VALUES (NEW.world_id, NEW.ticks, NEW.world_time, NEW.lease_owner, NEW.lease_epoch);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER tick_audit AFTER UPDATE ON world_states FOR EACH ROW
    WHEN (NEW.ticks <> OLD.ticks) EXECUTE FUNCTION tick_audit_fn();
"""


class ClusterError(AssertionError):
    """A cluster expectation did not hold (tests fail with it)."""


def poll(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Bounded polling: the first truthy value, or :class:`ClusterError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Cluster:
    """Daemons sharing one migrated PostgreSQL database (``url``: SQLAlchemy psycopg URL)."""

    url: str
    workdir: Path
    ttl: float = 2.0
    discovery: float = 0.5
    extra_env: dict[str, str] = field(default_factory=dict)
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(self.url)

    # ------------------------------------------------------------- database
    def reset(self, worlds: int, *, tick_interval: float = 1.0, npcs_per_world: int = 2) -> list[int]:
        """Fresh schema, ``worlds`` always-on worlds with a few NPCs, and the audit trigger."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        done = subprocess.run(
            [sys.executable, "-m", "scheduler_daemon", "db", "upgrade"],
            env=self.env("migrate"),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise ClusterError(f"db upgrade failed: {done.stderr[-2000:]}")
        meta = json.dumps({"simulation": {"alwaysOn": True, "tickIntervalSeconds": tick_interval, "timeScale": 60}})
        ids = []
        with self.engine.begin() as conn:
            for i in range(worlds):
                wid = conn.execute(
                    sa.text("INSERT INTO worlds (name, meta) VALUES (:n, CAST(:m AS jsonb)) RETURNING id"),
                    {"n": f"world-{i}", "m": meta},
                ).scalar_one()
                conn.execute(sa.text("INSERT INTO world_states (world_id) VALUES (:w)"), {"w": wid})
                for j in range(npcs_per_world):
                    conn.execute(
                        sa.text("INSERT INTO npcs (world_id, name, home, state) VALUES (:w, :n, 'h', '{}')"),
                        {"w": wid, "n": f"npc-{j}"},
                    )
                ids.append(int(wid))
            conn.execute(sa.text(AUDIT_SQL))
        return ids

    def owners(self) -> Counter[str]:
        """Live leases per owner."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT lease_owner, count(*) FROM world_states "
                    "WHERE lease_owner IS NOT NULL AND lease_expires_at > now() GROUP BY lease_owner"
                )
            ).all()
        return Counter({r[0]: int(r[1]) for r in rows})

    def leases(self) -> dict[int, tuple[str | None, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT world_id, lease_owner, lease_epoch FROM world_states")).all()
        return {int(r[0]): (r[1], int(r[2])) for r in rows}

    def db_now(self) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()

    def audit(self) -> list[tuple[int, int, float, str | None, int, Any]]:
        """Every committed tick: (world, ticks, world_time, owner, epoch, db time), in commit order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT world_id, ticks, world_time, lease_owner, lease_epoch, at FROM tick_audit ORDER BY id")
            ).all()
        return [(int(r[0]), int(r[1]), float(r[2]), r[3], int(r[4]), r[5]) for r in rows]

    def world_ticks(self) -> dict[int, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT world_id, ticks FROM world_states")).all()
        return {int(r[0]): int(r[1]) for r in rows}

    # -------------------------------------------------------------- daemons
    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
        env.update(
            SCHEDULER_DATABASE__URL=self.url,
            SCHEDULER_LOGGING__FORMAT="json",
            SCHEDULER_LOGGING__LEVEL="DEBUG",
            SCHEDULER_HTTP__ENABLED="false",
            SCHEDULER_SCHEDULER__INSTANCE_ID=name,
            SCHEDULER_SCHEDULER__LEASE_TTL_SECONDS=str(self.ttl),
            SCHEDULER_SCHEDULER__DISCOVERY_INTERVAL_SECONDS=str(self.discovery),
            PYTHONPATH=str(ROOT),
            **self.extra_env,
        )
        return env

    def start(self, name: str) -> Daemon:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:  # appended: a restarted instance keeps its history
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler_daemon", "run"],
                env=self.env(name),
                stdout=log,
                stderr=log,
                cwd=ROOT,
            )
        daemon = Daemon(name, proc, log_path)
        self.daemons[name] = daemon
        return daemon

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.daemons[name].proc.send_signal(sig)

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every running daemon (SIGCONT first, in case one is stopped); SIGKILL stragglers."""
        codes: dict[str, int | None] = {}
        for d in self.daemons.values():
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
                d.proc.send_signal(signal.SIGTERM)
        for name, d in self.daemons.items():
            try:
                codes[name] = d.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                codes[name] = d.proc.wait()
        return codes

    def close(self) -> None:
        for d in self.daemons.values():
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
                d.proc.kill()
                d.proc.wait()
        self.engine.dispose()

    # ---------------------------------------------------------------- reports
    def log_events(self, name: str) -> list[dict[str, Any]]:
        events = []
        for line in self.daemons[name].log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by SIGKILL
        return events

    def reported_ticks(self) -> dict[str, list[tuple[int, int, int]]]:
        """Per daemon: the ticks it reports as committed, (world, ticks after, epoch)."""
        reports: dict[str, list[tuple[int, int, int]]] = {}
        for name in self.daemons:
            ticks = [e for e in self.log_events(name) if e.get("event") == "tick"]
            unfenced = [e for e in ticks if e.get("lease_epoch") is None]
            if unfenced:
                raise ClusterError(f"{name} ticked without a lease: {unfenced[:3]}")
            reports[name] = [(int(e["world_id"]), int(e["ticks"]), int(e["lease_epoch"])) for e in ticks]
        return reports


def check_accounting(cluster: Cluster, *, killed: Iterable[str] = ()) -> dict[str, Any]:
    """Every committed tick applied exactly once, by its lease owner, and reported by it.

    A SIGKILLed daemon may have committed its last tick of a world without
    living to report it: at most one unreported tick per world, only at the
    end of one of its epochs. A tick whose COMMIT outcome the daemon could
    not learn (timeout) is unreported too, and must then have been adopted
    through a resync. Returns figures for the caller's assertions.
    """
    killed = set(killed)
    audit = cluster.audit()
    final = cluster.world_ticks()
    by_world: dict[int, list[tuple[int, float, str | None, int]]] = defaultdict(list)
    for world, ticks, world_time, owner, epoch, _ in audit:
        by_world[world].append((ticks, world_time, owner, epoch))
    for world, rows in by_world.items():
        numbers = [r[0] for r in rows]
        if numbers != list(range(1, len(rows) + 1)) or final[world] != len(rows):
            raise ClusterError(f"world {world}: tick numbers {numbers[:50]}… vs final {final[world]}")
        for (_, t0, _, e0), (n1, t1, _, e1) in itertools.pairwise(rows):
            if t1 < t0:
                raise ClusterError(f"world {world}: world time went backwards at tick {n1}")
            if e1 < e0:
                raise ClusterError(f"world {world}: epoch went backwards at tick {n1}")
        if any(r[2] is None for r in rows):
            raise ClusterError(f"world {world}: a tick was committed without a lease")
    committed = {(w, n): (owner, epoch) for w, n, _, owner, epoch, _ in audit}
    reports = cluster.reported_ticks()
    seen: Counter[tuple[int, int]] = Counter()
    for name, ticks in reports.items():
        for world, n, epoch in ticks:
            seen[(world, n)] += 1
            if committed.get((world, n)) != (name, epoch):
                raise ClusterError(
                    f"{name} reports world {world} tick {n} at epoch {epoch}, database has {committed.get((world, n))}"
                )
    doubles = [k for k, c in seen.items() if c > 1]
    if doubles:
        raise ClusterError(f"ticks reported twice: {doubles[:10]}")
    # A daemon that could not learn a commit's outcome (its tick timed out
    # during COMMIT) adopts it from the database: "world_state_resynchronised".
    resynced: dict[tuple[str, int], list[int]] = defaultdict(list)
    for name in cluster.daemons:
        for e in cluster.log_events(name):
            if e.get("event") == "world_state_resynchronised":
                resynced[(name, int(e["world_id"]))].append(int(e["ticks"]))
    unreported = [k for k in committed if k not in seen]
    unknown_outcome = 0
    for world, n in unreported:
        owner, epoch = committed[(world, n)]
        last_of_epoch = max(m for (w, m), (o, e) in committed.items() if w == world and (o, e) == (owner, epoch))
        adopted = any(r >= n and committed.get((world, r)) == (owner, epoch) for r in resynced[(owner or "", world)])
        if adopted:
            unknown_outcome += 1
        elif owner not in killed or n != last_of_epoch:
            raise ClusterError(f"world {world} tick {n} committed by {owner} (epoch {epoch}) but never reported")
    per_world_reported = Counter(w for ticks in reports.values() for w, _, _ in ticks)
    return {
        "committed": len(audit),
        "reported": sum(per_world_reported.values()),
        "unreported": len(unreported) - unknown_outcome,
        "unknown_outcome_adopted": unknown_outcome,
        "per_world_reported": per_world_reported,
        "final": final,
    }
