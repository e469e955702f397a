"""Fault 1b: the daemon's sessions killed while a *grouped* tick's write (or its COMMIT) is in progress.

test_fault_connections.py kills at random moments; whether a kill lands in a
grouped write (one transaction for several worlds) is left to chance there.
This test makes it deterministic. Test-only triggers (not a migration) sleep
inside the statement the test wants to hit, but only while a flag row says so
and only in a write that covers more than one world:

* ``npcs``: the grouped NPC write (``Store.write_decisions_many``, one
  ``UPDATE … FROM jsonb_to_recordset``) of a group;
* ``world_states``: the grouped clock move (``Store.advance_world_states``,
  one ``UPDATE … FROM unnest``);
* ``commit``: a deferred constraint trigger on ``world_states`` that sleeps
  at ``COMMIT`` of a transaction whose clock move covered several worlds.

The test arms one of them, waits until a daemon backend sleeps in it (so the
group formed and its transaction is inside that statement), disarms it and
terminates the daemon's sessions. The retry must then commit normally. The
audit proves that no tick was lost or counted twice and that every committed
tick's world time matches the real time between its ``last_advanced_at``
stamps (within one daemon run, 0.1 s), and the daemon's log must show no tick
failed on the dead connection after the kill (``PendingRollbackError``, the
soak's symptom when the grouped fallback re-ran worlds on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants
from tests.faults.harness import (
    APPLICATION_NAME,
    FaultDatabase,
    daemon_env,
    kill_daemon_sessions,
    poll,
    profile,
    record_result,
    running_daemon,
    seed_worlds,
    wait_for_progress,
    write_config,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

WORLDS = 6
WORLD: dict[str, Any] = {"timeScale": 600.0, "tickIntervalSeconds": 0.2, "maxCatchUpSeconds": 30.0}
# Detailed NPCs decide every 60 game s (0.1 real s): every tick writes NPC rows.
NPCS = {Tier.DETAILED: 3, Tier.ACTIVE: 2}
#: Where the kill lands (see the module docstring), in rotation.
MODES = ("npcs", "world_states", "commit")
#: The armed trigger sleeps this long; the test kills within a poll interval of it starting.
SLEEP_SECONDS = 2.0
#: Which statement a sleeping backend must be running for each mode (its pg_stat_activity.query).
STATEMENT = {"npcs": "UPDATE npcs SET", "world_states": "UPDATE world_states AS ws", "commit": "COMMIT"}

# Test-only objects. The statement-level triggers see the whole statement's rows
# (transition tables), so they can tell a grouped write from a one-world one,
# and a tick's clock move (ticks + 1) from a lease renewal.
_FAULT_DDL = [
    "CREATE TABLE fault_arm (id integer PRIMARY KEY, mode text)",
    "INSERT INTO fault_arm VALUES (1, NULL)",
    f"""CREATE FUNCTION fault_grouped_npcs_fn() RETURNS trigger AS $$
        BEGIN
            IF (SELECT mode FROM fault_arm WHERE id = 1) = 'npcs' AND (
                SELECT count(DISTINCT n.world_id) FROM new_rows n JOIN old_rows o ON o.id = n.id
                WHERE n.decisions = o.decisions + 1) > 1 THEN
                PERFORM pg_sleep({SLEEP_SECONDS});
            END IF;
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER fault_grouped_npcs AFTER UPDATE ON npcs
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION fault_grouped_npcs_fn()""",
    f"""CREATE FUNCTION fault_grouped_clock_fn() RETURNS trigger AS $$
        BEGIN
            IF (SELECT count(*) FROM new_rows n JOIN old_rows o ON o.world_id = n.world_id
                WHERE n.ticks = o.ticks + 1) > 1 THEN
                -- Tells the deferred COMMIT trigger below that this transaction is a group's.
                PERFORM set_config('fault.grouped', 'on', true);
                IF (SELECT mode FROM fault_arm WHERE id = 1) = 'world_states' THEN
                    PERFORM pg_sleep({SLEEP_SECONDS});
                END IF;
            END IF;
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER fault_grouped_clock AFTER UPDATE ON world_states
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION fault_grouped_clock_fn()""",
    f"""CREATE FUNCTION fault_grouped_commit_fn() RETURNS trigger AS $$
        BEGIN
            IF current_setting('fault.grouped', true) = 'on'
                AND (SELECT mode FROM fault_arm WHERE id = 1) = 'commit' THEN
                PERFORM set_config('fault.grouped', 'off', true);  -- once per transaction
                PERFORM pg_sleep({SLEEP_SECONDS});
            END IF;
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    """CREATE CONSTRAINT TRIGGER fault_grouped_commit AFTER UPDATE ON world_states
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.ticks IS DISTINCT FROM NEW.ticks)
        EXECUTE FUNCTION fault_grouped_commit_fn()""",
]


def _install_faults(db: FaultDatabase) -> None:
    with db.engine.begin() as conn:
        for ddl in _FAULT_DDL:
            conn.exec_driver_sql(ddl)


def _arm(db: FaultDatabase, mode: str | None) -> None:
    db.execute("UPDATE fault_arm SET mode = :m WHERE id = 1", {"m": mode})


def _sleeping(db: FaultDatabase) -> list[tuple[int, str]]:
    """``(pid, statement)`` of every daemon backend sleeping in one of the fault triggers."""
    rows = db.execute(
        "SELECT pid, query FROM pg_stat_activity WHERE application_name = :app AND datname = :db "
        "AND wait_event = 'PgSleep'",
        {"app": APPLICATION_NAME, "db": db.name},
    )
    return [(int(r[0]), str(r[1])) for r in rows]


def _stamp_deviation(report_rows: dict[int, list[Any]], scale: float) -> float:
    """Largest |world time covered − real time between the tick's stamps| over all ticks, in real s."""
    worst = 0.0
    for rows in report_rows.values():
        for row in rows:
            if row.old_adv is not None and row.new_adv is not None:
                real = (row.new_adv - row.old_adv).total_seconds()
                worst = max(worst, abs(row.delta / scale - real))
    return worst


def test_kill_inside_a_grouped_write_or_its_commit_keeps_clocks_exact(
    pg_fault_db: FaultDatabase, tmp_path: Path
) -> None:
    db = pg_fault_db
    rounds = profile().grouped_write_kills
    worlds = seed_worlds(db, WORLDS, simulation=WORLD, npcs_per_tier=NPCS)
    _install_faults(db)
    # A wide batch window: worlds falling due within half an interval tick as one
    # group (at the default 1 ms each world registered a few ms apart ticks alone).
    config = write_config(
        tmp_path / "config.toml",
        scheduler={"batch_window_seconds": 0.1, "tick_timeout_seconds": 5.0, "backoff_max_seconds": 2.0},
    )
    landed: dict[str, int] = dict.fromkeys(MODES, 0)
    sessions_killed = 0
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        wait_for_progress(db, worlds, timeout=60, what="first ticks")
        for n in range(rounds):
            mode = MODES[n % len(MODES)]
            _arm(db, mode)
            try:
                sleepers = poll(
                    lambda: _sleeping(db), timeout=10, interval=0.01, what=f"a grouped tick to reach {mode}"
                )
            finally:
                _arm(db, None)  # the retry must go through
            statements = [q for _, q in sleepers]
            assert all(q.startswith(STATEMENT[mode]) for q in statements), (mode, statements)
            sessions_killed += kill_daemon_sessions(db)
            landed[mode] += 1
            # A terminated backend leaves pg_stat_activity only once it has exited:
            # wait for that, or the next round could take it for a new sleeper.
            poll(lambda: not _sleeping(db), timeout=10, what="the killed backends to exit")
            assert daemon.alive(), daemon.log_tail()
            wait_for_progress(db, worlds, timeout=15, what=f"every world to tick again after kill {n + 1} ({mode})")
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    rules = {w: WorldRules(WORLD["timeScale"], WORLD["maxCatchUpSeconds"]) for w in worlds}
    report = check_invariants(db, rules)
    retried = [e for e in daemon.events("retrying") if e["operation"] == "tick"]
    failed = daemon.events("tick_failed")
    # On a dead connection nothing can run any more: a tick failing with it means
    # the daemon went on using the connection after the kill instead of retrying.
    dead_connection = [line for line in retried + failed if "PendingRollbackError" in str(line)]
    deviation = _stamp_deviation(report.ticks_by_world, WORLD["timeScale"])
    record_result(
        "grouped-write-killed",
        backend="postgres",
        rounds=rounds,
        kills_in_npc_write=landed["npcs"],
        kills_in_clock_write=landed["world_states"],
        kills_at_commit=landed["commit"],
        sessions_killed=sessions_killed,
        failed_attempts=len(retried),
        failed_batches=len(failed),
        dead_connection_failures=len(dead_connection),
        max_stamp_deviation_seconds=round(deviation, 4),
        violations=len(report.violations),
        summary=report.summary(),
    )
    assert report.violations == [], "\n".join(report.violations)
    assert dead_connection == [], f"ticks failed on the killed connection: {dead_connection[:3]}"
    # Each kill failed an attempt of the grouped tick, which the runner re-ran whole.
    assert len(retried) >= rounds, f"{len(retried)} retried attempts for {rounds} kills"
