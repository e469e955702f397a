"""Audit triggers and the invariant checker of the fault suite.

The test (not a migration) installs AFTER UPDATE triggers on ``world_states``
and ``npcs`` that append every change of the clock and of an NPC's decision
columns to audit tables in the same database. A trigger's insert belongs to
the transaction that fired it, so the audit holds exactly the committed
effects: a rolled-back tick leaves no row. The checker then proves, from the
database alone, what the daemon may never do:

* a world's committed ticks form one unbroken chain (each tick starts where
  the previous one ended, ``ticks`` +1 each time), world time never goes
  backwards, and the final world time is the sum of the committed deltas;
* a tick never covers more real time than elapsed since the previous one
  (``last_advanced_at`` is the wall time each world time corresponds to), nor
  more than ``maxCatchUpSeconds``; across a daemon restart it never covers the
  downtime; within one daemon run it covers exactly the elapsed time;
* each NPC decision commits together with the tick whose world time it was
  taken at, the decision counter steps by one, decision times strictly
  increase, and no NPC is skipped at a tick where it was due and the budget
  had room (the history is gap-free);
* other worlds kept their tick rate while something else was failing;
* no generation request is lost or handed out twice concurrently
  (:func:`check_generation`, over an audit of every status/hand-off change
  and the deliveries the fault sink recorded).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.faults.harness import FaultDatabase

_WORLD_COLS = "world_id, old_time, new_time, old_ticks, new_ticks, old_adv, new_adv"
_NPC_COLS = "npc_id, world_id, old_decisions, new_decisions, old_last, new_last, old_next, new_next, world_ticks"

_PG_DDL = [
    """CREATE TABLE audit_world_ticks (
        seq bigserial PRIMARY KEY, world_id integer, old_time double precision, new_time double precision,
        old_ticks bigint, new_ticks bigint, old_adv timestamptz, new_adv timestamptz)""",
    """CREATE TABLE audit_npc_decisions (
        seq bigserial PRIMARY KEY, npc_id integer, world_id integer, old_decisions bigint, new_decisions bigint,
        old_last double precision, new_last double precision, old_next double precision,
        new_next double precision, world_ticks bigint)""",
    f"""CREATE FUNCTION audit_world_ticks_fn() RETURNS trigger AS $$
        BEGIN
            INSERT INTO audit_world_ticks ({_WORLD_COLS}) VALUES (OLD.world_id, OLD.world_time, NEW.world_time,
                OLD.ticks, NEW.ticks, OLD.last_advanced_at, NEW.last_advanced_at);
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER audit_world_ticks AFTER UPDATE ON world_states FOR EACH ROW
        WHEN (OLD.ticks IS DISTINCT FROM NEW.ticks OR OLD.world_time IS DISTINCT FROM NEW.world_time)
        EXECUTE FUNCTION audit_world_ticks_fn()""",
    f"""CREATE FUNCTION audit_npc_decisions_fn() RETURNS trigger AS $$
        BEGIN
            INSERT INTO audit_npc_decisions ({_NPC_COLS}) VALUES (NEW.id, NEW.world_id, OLD.decisions, NEW.decisions,
                OLD.last_decision_at, NEW.last_decision_at, OLD.next_decision_at, NEW.next_decision_at,
                (SELECT ticks FROM world_states WHERE world_id = NEW.world_id));
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER audit_npc_decisions AFTER UPDATE ON npcs FOR EACH ROW
        WHEN (OLD.decisions IS DISTINCT FROM NEW.decisions
              OR OLD.last_decision_at IS DISTINCT FROM NEW.last_decision_at)
        EXECUTE FUNCTION audit_npc_decisions_fn()""",
]

_GEN_COLS = "request_id, world_id, op, old_status, new_status, old_handed_off, new_handed_off, attempts, at"

_PG_GEN_DDL = [
    """CREATE TABLE audit_generation (
        seq bigserial PRIMARY KEY, request_id bigint, world_id integer, op text, old_status text, new_status text,
        old_handed_off boolean, new_handed_off boolean, attempts integer, at double precision)""",
    # clock_timestamp(): the moment of the statement (the sink's records are compared with it).
    f"""CREATE FUNCTION audit_generation_fn() RETURNS trigger AS $$
        DECLARE at double precision := extract(epoch FROM clock_timestamp());
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO audit_generation ({_GEN_COLS})
                VALUES (NEW.id, NEW.world_id, 'INSERT', NULL, NEW.status, NULL, NEW.handed_off, NEW.attempts, at);
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO audit_generation ({_GEN_COLS})
                VALUES (OLD.id, OLD.world_id, 'DELETE', OLD.status, NULL, OLD.handed_off, NULL, OLD.attempts, at);
            ELSIF OLD.status IS DISTINCT FROM NEW.status OR OLD.handed_off IS DISTINCT FROM NEW.handed_off THEN
                INSERT INTO audit_generation ({_GEN_COLS})
                VALUES (NEW.id, NEW.world_id, 'UPDATE', OLD.status, NEW.status, OLD.handed_off, NEW.handed_off,
                        NEW.attempts, at);
            END IF;
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER audit_generation AFTER INSERT OR UPDATE OR DELETE ON generation_requests
        FOR EACH ROW EXECUTE FUNCTION audit_generation_fn()""",
]

# SQLite's clock has millisecond resolution: the checker allows for it.
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"

_SQLITE_GEN_DDL = [
    """CREATE TABLE audit_generation (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id INTEGER, world_id INTEGER, op TEXT, old_status TEXT,
        new_status TEXT, old_handed_off INTEGER, new_handed_off INTEGER, attempts INTEGER, at REAL)""",
    f"""CREATE TRIGGER audit_generation_insert AFTER INSERT ON generation_requests
        BEGIN
            INSERT INTO audit_generation ({_GEN_COLS})
            VALUES (NEW.id, NEW.world_id, 'INSERT', NULL, NEW.status, NULL, NEW.handed_off, NEW.attempts,
                    {_SQLITE_NOW});
        END""",
    f"""CREATE TRIGGER audit_generation_update AFTER UPDATE ON generation_requests
        WHEN OLD.status IS NOT NEW.status OR OLD.handed_off IS NOT NEW.handed_off
        BEGIN
            INSERT INTO audit_generation ({_GEN_COLS})
            VALUES (NEW.id, NEW.world_id, 'UPDATE', OLD.status, NEW.status, OLD.handed_off, NEW.handed_off,
                    NEW.attempts, {_SQLITE_NOW});
        END""",
    f"""CREATE TRIGGER audit_generation_delete AFTER DELETE ON generation_requests
        BEGIN
            INSERT INTO audit_generation ({_GEN_COLS})
            VALUES (OLD.id, OLD.world_id, 'DELETE', OLD.status, NULL, OLD.handed_off, NULL, OLD.attempts,
                    {_SQLITE_NOW});
        END""",
]

_SQLITE_DDL = [
    """CREATE TABLE audit_world_ticks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, world_id INTEGER, old_time REAL, new_time REAL,
        old_ticks INTEGER, new_ticks INTEGER, old_adv TEXT, new_adv TEXT)""",
    """CREATE TABLE audit_npc_decisions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, npc_id INTEGER, world_id INTEGER, old_decisions INTEGER,
        new_decisions INTEGER, old_last REAL, new_last REAL, old_next REAL, new_next REAL, world_ticks INTEGER)""",
    f"""CREATE TRIGGER audit_world_ticks AFTER UPDATE ON world_states
        WHEN OLD.ticks IS NOT NEW.ticks OR OLD.world_time IS NOT NEW.world_time
        BEGIN
            INSERT INTO audit_world_ticks ({_WORLD_COLS}) VALUES (OLD.world_id, OLD.world_time, NEW.world_time,
                OLD.ticks, NEW.ticks, OLD.last_advanced_at, NEW.last_advanced_at);
        END""",
    f"""CREATE TRIGGER audit_npc_decisions AFTER UPDATE ON npcs
        WHEN OLD.decisions IS NOT NEW.decisions OR OLD.last_decision_at IS NOT NEW.last_decision_at
        BEGIN
            INSERT INTO audit_npc_decisions ({_NPC_COLS}) VALUES (NEW.id, NEW.world_id, OLD.decisions, NEW.decisions,
                OLD.last_decision_at, NEW.last_decision_at, OLD.next_decision_at, NEW.next_decision_at,
                (SELECT ticks FROM world_states WHERE world_id = NEW.world_id));
        END""",
]


def install_audit(db: FaultDatabase) -> None:
    """Create the audit tables and triggers (test-only objects, not part of the schema)."""
    with db.engine.begin() as conn:
        for ddl in [*_PG_DDL, *_PG_GEN_DDL] if db.backend == "postgres" else [*_SQLITE_DDL, *_SQLITE_GEN_DDL]:
            conn.exec_driver_sql(ddl)


def _ts(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TickRow:
    seq: int
    world_id: int
    old_time: float
    new_time: float
    old_ticks: int
    new_ticks: int
    old_adv: datetime | None
    new_adv: datetime | None

    @property
    def delta(self) -> float:
        return self.new_time - self.old_time


@dataclass(frozen=True, slots=True)
class DecisionRow:
    seq: int
    npc_id: int
    world_id: int
    old_decisions: int
    new_decisions: int
    old_last: float | None
    new_last: float | None
    old_next: float
    new_next: float
    world_ticks: int


def read_ticks(db: FaultDatabase) -> list[TickRow]:
    rows = db.execute(f"SELECT seq, {_WORLD_COLS} FROM audit_world_ticks ORDER BY seq")
    return [
        TickRow(int(r[0]), int(r[1]), float(r[2]), float(r[3]), int(r[4]), int(r[5]), _ts(r[6]), _ts(r[7]))
        for r in rows
    ]


def read_decisions(db: FaultDatabase) -> list[DecisionRow]:
    rows = db.execute(f"SELECT seq, {_NPC_COLS} FROM audit_npc_decisions ORDER BY seq")
    return [
        DecisionRow(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            int(r[4]),
            None if r[5] is None else float(r[5]),
            None if r[6] is None else float(r[6]),
            float(r[7]),
            float(r[8]),
            int(r[9]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class WorldRules:
    """What a world's config promises (the values the test seeded)."""

    time_scale: float
    max_catch_up_seconds: float
    npc_budget: int = 50


@dataclass
class AuditReport:
    """Result of :func:`check_invariants`: violations (must be empty) and counts."""

    violations: list[str] = field(default_factory=list)
    ticks: dict[int, int] = field(default_factory=dict)
    decisions: int = 0
    ticks_by_world: dict[int, list[TickRow]] = field(default_factory=dict)

    def add(self, message: str) -> None:
        if len(self.violations) < 200:  # enough to diagnose; keep failure output readable
            self.violations.append(message)

    def summary(self) -> str:
        return (
            f"{sum(self.ticks.values())} committed ticks in {len(self.ticks)} worlds, "
            f"{self.decisions} NPC decisions, {len(self.violations)} violations"
        )


def check_invariants(
    db: FaultDatabase,
    rules: Mapping[int, WorldRules],
    *,
    restarts: Iterable[datetime] = (),
    exact_rate: bool = True,
    tolerance_seconds: float = 0.1,
    rewritten_npcs: Iterable[int] = (),
) -> AuditReport:
    """Check every invariant over the audit; ``rules`` names the worlds that must be checked.

    ``restarts`` are the wall times daemons were (re)started: a tick spanning
    one may cover only the time since that start, never the downtime.
    ``exact_rate=False`` drops the "within one run a tick covers exactly the
    elapsed real time" check (for tests that change a world's config).
    ``rewritten_npcs`` are NPCs the test itself rewrote with SQL (corrupted,
    then fixed): their decision history is not checked, their worlds' clocks are.
    """
    report = AuditReport()
    by_world: dict[int, list[TickRow]] = defaultdict(list)
    for row in read_ticks(db):
        by_world[row.world_id].append(row)
    report.ticks_by_world = dict(by_world)
    starts = sorted(restarts)
    final = {
        int(r[0]): (float(r[1]), int(r[2])) for r in db.execute("SELECT world_id, world_time, ticks FROM world_states")
    }
    for world_id, rule in rules.items():
        rows = by_world.get(world_id, [])
        report.ticks[world_id] = len(rows)
        _check_clock(report, world_id, rows, rule, starts, exact_rate, tolerance_seconds, final.get(world_id))
    decisions = read_decisions(db)
    report.decisions = len(decisions)
    skip = set(rewritten_npcs)
    _check_decisions(db, report, rules, by_world, [d for d in decisions if d.npc_id not in skip], skip)
    return report


def _check_clock(
    report: AuditReport,
    world_id: int,
    rows: Sequence[TickRow],
    rule: WorldRules,
    starts: Sequence[datetime],
    exact_rate: bool,
    tol: float,
    final: tuple[float, int] | None,
) -> None:
    scale, cap = rule.time_scale, rule.max_catch_up_seconds
    slack = tol * scale
    prev: TickRow | None = None
    for row in rows:
        where = f"world {world_id} tick {row.old_ticks}->{row.new_ticks} (audit seq {row.seq})"
        if row.new_ticks != row.old_ticks + 1:
            report.add(f"{where}: tick counter did not step by one")
        if prev is not None and (row.old_ticks != prev.new_ticks or row.old_time != prev.new_time):
            report.add(
                f"{where}: starts at ({row.old_time}, {row.old_ticks}) but the previous committed tick ended at "
                f"({prev.new_time}, {prev.new_ticks}): a committed tick was lost or applied twice"
            )
        if not math.isfinite(row.new_time) or row.new_time < row.old_time:
            report.add(f"{where}: world time went backwards or non-finite ({row.old_time} -> {row.new_time})")
        if row.delta > cap * scale * (1 + 1e-9) + 1e-6:
            report.add(f"{where}: advanced {row.delta:g} game s, more than maxCatchUpSeconds × timeScale")
        if row.old_adv is not None and row.new_adv is not None:
            real = (row.new_adv - row.old_adv).total_seconds()
            allowed = min(max(real, 0.0), cap) * scale
            crossed = [s for s in starts if row.old_adv < s <= row.new_adv]
            if crossed:
                since_start = (row.new_adv - crossed[-1]).total_seconds()
                if row.delta > min(max(since_start, 0.0), cap) * scale + slack:
                    report.add(
                        f"{where}: advanced {row.delta:g} game s across a daemon restart but only "
                        f"{since_start:.3f} s passed since that daemon started: the downtime was counted"
                    )
            elif row.delta > allowed + slack:
                report.add(
                    f"{where}: advanced {row.delta:g} game s but only {real:.3f} real s passed since the previous "
                    f"tick ({allowed:g} game s allowed): time was counted twice"
                )
            elif exact_rate and row.delta < allowed - slack:
                report.add(
                    f"{where}: advanced {row.delta:g} game s for {real:.3f} real s ({allowed:g} expected): "
                    "world time fell behind real time"
                )
        prev = row
    if final is not None:
        if rows:
            total = rows[0].old_time + sum(r.delta for r in rows)
            if (final[0], final[1]) != (rows[-1].new_time, rows[-1].new_ticks) or not math.isclose(
                final[0], total, rel_tol=1e-9, abs_tol=1e-6
            ):
                report.add(
                    f"world {world_id}: final state {final} is not the last committed tick "
                    f"({rows[-1].new_time}, {rows[-1].new_ticks}) / sum of deltas {total}"
                )
        elif final[1] != 0:
            report.add(f"world {world_id}: state moved ({final}) without an audited tick")


def _check_decisions(
    db: FaultDatabase,
    report: AuditReport,
    rules: Mapping[int, WorldRules],
    by_world: Mapping[int, Sequence[TickRow]],
    decisions: Sequence[DecisionRow],
    skip: set[int],
) -> None:
    per_npc: dict[int, list[DecisionRow]] = defaultdict(list)
    per_tick: dict[tuple[int, int], int] = defaultdict(int)
    for d in decisions:
        per_npc[d.npc_id].append(d)
        per_tick[(d.world_id, d.world_ticks)] += 1
    tick_index = {w: {r.old_ticks: r for r in rows} for w, rows in by_world.items()}
    olds = {w: [r.old_ticks for r in rows] for w, rows in by_world.items()}
    npcs = db.execute("SELECT id, world_id, tier, next_decision_at FROM npcs")
    for npc_id, world_id, tier, current_next in npcs:
        if world_id not in rules or tier > 3 or npc_id in skip:  # frozen NPCs are never selected
            continue
        rows, ticks = by_world.get(world_id, []), tick_index.get(world_id, {})
        budget = rules[world_id].npc_budget
        history = per_npc.get(npc_id, [])
        due = history[0].old_next if history else float(current_next)
        after: int | None = None  # index (old_ticks) of the tick of the previous decision
        prev: DecisionRow | None = None
        for d in history:
            where = f"world {world_id} npc {npc_id} decision {d.new_decisions} (audit seq {d.seq})"
            if d.new_decisions != d.old_decisions + 1:
                report.add(f"{where}: decision counter stepped {d.old_decisions}->{d.new_decisions}")
            if prev is not None and (d.old_decisions, d.old_last, d.old_next) != (
                prev.new_decisions,
                prev.new_last,
                prev.new_next,
            ):
                report.add(f"{where}: does not continue the previous committed decision")
            if d.new_last is None or (d.old_last is not None and not d.new_last > d.old_last):
                report.add(f"{where}: decision time not strictly increasing ({d.old_last} -> {d.new_last})")
            tick = ticks.get(d.world_ticks)
            if tick is None:
                report.add(f"{where}: committed without a committed tick of its world (world at {d.world_ticks})")
            else:
                if d.new_last != tick.new_time:
                    report.add(f"{where}: taken at {d.new_last}, but its tick committed world time {tick.new_time}")
                if d.old_next > tick.new_time + 1e-6:
                    report.add(f"{where}: decided before it was due ({d.old_next} > {tick.new_time})")
                _check_not_skipped(report, where, rows, olds[world_id], after, d.world_ticks, due, per_tick, budget)
            after, due, prev = d.world_ticks, d.new_next, d
        end = (rows[-1].old_ticks + 1) if rows else 0
        _check_not_skipped(
            report,
            f"world {world_id} npc {npc_id} after its last decision",
            rows,
            olds.get(world_id, []),
            after,
            end,
            due,
            per_tick,
            budget,
        )


def _check_not_skipped(
    report: AuditReport,
    where: str,
    rows: Sequence[TickRow],
    olds: Sequence[int],
    after: int | None,
    before: int,
    due: float,
    per_tick: Mapping[tuple[int, int], int],
    budget: int,
) -> None:
    """No committed tick strictly between ``after`` and ``before`` had the NPC due and budget to spare."""
    lo = 0 if after is None else bisect.bisect_right(olds, after)
    hi = bisect.bisect_left(olds, before)
    for row in rows[lo:hi]:
        if row.new_time >= due and per_tick.get((row.world_id, row.old_ticks), 0) < budget:
            report.add(
                f"{where}: due at {due} but skipped by tick {row.old_ticks}->{row.new_ticks} "
                f"(world time {row.new_time}) that had NPC budget to spare"
            )
            return


def check_rate(
    report: AuditReport,
    worlds: Iterable[int],
    *,
    window: tuple[datetime, datetime],
    max_gap_seconds: float,
) -> dict[int, float]:
    """Other worlds kept ticking: no gap between commits (or window edges) longer than ``max_gap_seconds``.

    Returns each world's longest gap. Violations are added to ``report``.
    """
    start, end = window
    gaps: dict[int, float] = {}
    for world_id in worlds:
        times = [r.new_adv for r in report.ticks_by_world.get(world_id, []) if r.new_adv and start <= r.new_adv <= end]
        points = [start, *times, end]
        longest = max((b - a).total_seconds() for a, b in itertools.pairwise(points))
        gaps[world_id] = longest
        if longest > max_gap_seconds:
            report.add(
                f"world {world_id}: no committed tick for {longest:.2f} s between {start:%H:%M:%S.%f} and "
                f"{end:%H:%M:%S.%f} (allowed {max_gap_seconds} s) while another world was failing"
            )
    return gaps


# ------------------------------------------------------ generation requests
@dataclass(frozen=True, slots=True)
class Delivery:
    """One call of the fault sink (``tests.faults.plugins:recording_sink``)."""

    request_id: int
    pid: int
    at: float  # Unix time of the call


def read_deliveries(path: Path) -> list[Delivery]:
    """Every delivery the sink recorded in ``path`` (one ``<id> <pid> <unix time>`` line each)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        request_id, pid, at = line.split()
        out.append(Delivery(int(request_id), int(pid), float(at)))
    return out


@dataclass(frozen=True, slots=True)
class GenerationChange:
    seq: int
    request_id: int
    world_id: int
    op: str
    old_status: str | None
    new_status: str | None
    old_handed_off: bool | None
    new_handed_off: bool | None
    at: float


def read_generation_changes(db: FaultDatabase) -> list[GenerationChange]:
    rows = db.execute(f"SELECT seq, {_GEN_COLS} FROM audit_generation ORDER BY seq")
    return [
        GenerationChange(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            str(r[3]),
            r[4],
            r[5],
            None if r[6] is None else bool(r[6]),
            None if r[7] is None else bool(r[7]),
            float(r[9]),
        )
        for r in rows
    ]


@dataclass
class _Claim:
    """One claim of a request: ``enqueued`` from ``pending`` until handed off or moved on."""

    start: float
    acked: float | None = None
    ended: float | None = None
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationFigures:
    requests: int
    claims: int
    deliveries: int
    redeliveries: int  # at-least-once: deliveries beyond the first of a claim (after a crash)


def check_generation(
    db: FaultDatabase,
    report: AuditReport,
    sink_file: Path,
    *,
    processes: Mapping[int, tuple[datetime | None, datetime | None]],
    interrupted: Iterable[tuple[int, datetime]] = (),
    settled: bool = True,
    tolerance_seconds: float = 0.005,
) -> GenerationFigures:
    """No generation request lost or handed out twice concurrently; violations go to ``report``.

    ``processes`` maps each daemon's pid to its (start, stop) wall times. A
    request is handed out at least once per claim (a claim that the database
    marks handed off must have reached the sink), never before it was
    claimed or after its hand-off was confirmed, and again only once the
    previous hand-off of the same claim ended unconfirmed: its daemon logged
    the hand-off (or the tick around it) as interrupted in between
    (``interrupted``: ``(world_id, when)`` of those log lines), or its
    daemon is gone (the crash between hand-off and bookkeeping that the
    outbox tolerates). ``settled``: the test waited for the outbox to drain,
    so no request may still be pending or waiting in it.
    ``tolerance_seconds`` covers SQLite's millisecond clock.
    """
    tol = tolerance_seconds
    claims: dict[int, list[_Claim]] = defaultdict(list)
    inserted: set[int] = set()
    world_of: dict[int, int] = {}
    breaks: dict[int, list[float]] = defaultdict(list)
    for world_id, when in interrupted:
        breaks[world_id].append(when.timestamp())
    for c in read_generation_changes(db):
        where = f"generation request {c.request_id} (audit seq {c.seq})"
        world_of[c.request_id] = c.world_id
        if c.op == "INSERT":
            inserted.add(c.request_id)
        elif c.op == "DELETE":
            report.add(f"{where}: deleted while {c.old_status}: the request was lost")
        else:
            history = claims[c.request_id]
            open_claim = history[-1] if history and history[-1].ended is None else None
            if c.new_status == "enqueued" and c.old_status != "enqueued":
                if c.old_status != "pending":
                    report.add(f"{where}: claimed from {c.old_status}, not pending")
                history.append(_Claim(c.at))
            elif c.old_status == "enqueued" and open_claim is not None:
                open_claim.ended = c.at
            if c.new_handed_off and not c.old_handed_off:
                if open_claim is None or c.new_status != "enqueued":
                    report.add(f"{where}: marked handed off while {c.new_status} without an open claim")
                else:
                    open_claim.acked = c.at
    deliveries = read_deliveries(sink_file)
    for d in deliveries:
        where = f"generation request {d.request_id} handed out by pid {d.pid} at {d.at:.6f}"
        started = [k for k in claims.get(d.request_id, []) if k.start <= d.at + tol]
        if not started:
            report.add(f"{where}: before it was claimed")
            continue
        claim = started[-1]
        if claim.acked is not None and d.at > claim.acked + tol:
            report.add(f"{where}: after its hand-off was confirmed at {claim.acked:.6f} (handed out twice)")
        elif claim.ended is not None and d.at > claim.ended + tol:
            report.add(f"{where}: after it left the outbox at {claim.ended:.6f}")
        claim.deliveries.append(d)
    redeliveries = 0
    for request_id, history in claims.items():
        for n, claim in enumerate(history):
            where = f"generation request {request_id} claim {n + 1}"
            if claim.acked is not None and not claim.deliveries:
                report.add(f"{where}: marked handed off but the sink never received it (lost)")
            redeliveries += max(len(claim.deliveries) - 1, 0)
            for a, b in itertools.pairwise(sorted(claim.deliveries, key=lambda d: d.at)):
                if a.pid == b.pid:
                    if not any(a.at - tol <= t <= b.at + tol for t in breaks.get(world_of[request_id], [])):
                        report.add(
                            f"{where}: handed out again by pid {a.pid} at {b.at:.6f} although its hand-off at "
                            f"{a.at:.6f} was never interrupted (handed out twice concurrently)"
                        )
                    continue
                stopped = processes.get(a.pid, (None, None))[1]
                if stopped is None or stopped.timestamp() > b.at + tol:
                    report.add(
                        f"{where}: handed out by pid {b.pid} at {b.at:.6f} while pid {a.pid}, which handed it out "
                        f"at {a.at:.6f}, was still running (handed out twice concurrently)"
                    )
    final = {
        int(r[0]): (str(r[1]), bool(r[2])) for r in db.execute("SELECT id, status, handed_off FROM generation_requests")
    }
    for request_id in sorted(inserted - final.keys()):
        report.add(f"generation request {request_id}: created but gone (lost)")
    if settled:
        for request_id, (status, handed_off) in sorted(final.items()):
            if status == "pending" or (status == "enqueued" and not handed_off):
                report.add(
                    f"generation request {request_id}: still {status}{'' if handed_off else ', not handed off'} "
                    "after the daemon recovered (lost in the outbox)"
                )
    return GenerationFigures(
        requests=len(final),
        claims=sum(len(h) for h in claims.values()),
        deliveries=len(deliveries),
        redeliveries=redeliveries,
    )
