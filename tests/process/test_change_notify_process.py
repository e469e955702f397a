"""Two real daemons on one PostgreSQL: a session row inserted with SQL reaches the tiers through NOTIFY.

Discovery polls once a minute here, so only the change notification can move
a tier within the bound (250 ms + one tick interval). Tier writes are timed in
the database: a test trigger records every change of ``npcs.tier`` with the
database's clock, next to the clock of the session's insert.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.cluster import Cluster, poll

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess]

INTERVAL = 1.0
TTL = 6.0
#: Long enough that no poll can be what moved a tier.
DISCOVERY = 60.0
#: The issue's bound: within 250 ms or one tick, whichever is later; we allow their sum.
BOUND = 0.25 + INTERVAL
LISTENER = "scheduler-daemon changes"

TIER_AUDIT_SQL = """
CREATE TABLE tier_audit (npc_id integer NOT NULL, tier smallint NOT NULL, at timestamptz NOT NULL);
CREATE FUNCTION tier_audit_fn() RETURNS trigger AS $$
BEGIN
    INSERT INTO tier_audit VALUES (NEW.id, NEW.tier, clock_timestamp());
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER tier_audit AFTER UPDATE OF tier ON npcs FOR EACH ROW
    WHEN (NEW.tier <> OLD.tier) EXECUTE FUNCTION tier_audit_fn();
"""


@pytest.fixture
def cluster(tmp_path: Path, pg_database_url: str) -> Iterator[Cluster]:
    c = Cluster(pg_database_url, tmp_path, ttl=TTL, discovery=DISCOVERY)
    try:
        c.reset(2, tick_interval=INTERVAL, npcs_per_world=2)
        with c.engine.begin() as conn:
            conn.execute(sa.text(TIER_AUDIT_SQL))
        yield c
    finally:
        c.close()


def events(cluster: Cluster, name: str, event: str) -> list[dict[str, object]]:
    return [e for e in cluster.log_events(name) if e.get("event") == event]


def listeners(cluster: Cluster) -> set[int]:
    with cluster.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :a AND datname = current_database()"),
            {"a": LISTENER},
        ).all()
    return {int(r[0]) for r in rows}


def promoted_after(cluster: Cluster, npc: int, since: datetime) -> float | None:
    """Seconds from ``since`` to the NPC's promotion to detailed (database clock), if it happened."""
    with cluster.engine.connect() as conn:
        at = conn.execute(
            sa.text("SELECT min(at) FROM tier_audit WHERE npc_id = :n AND tier = 0 AND at >= :s"),
            {"n": npc, "s": since},
        ).scalar_one()
    return None if at is None else (at - since).total_seconds()


def open_session(cluster: Cluster, world: int, npc: int) -> datetime:
    """What a game backend does when a player looks at an NPC: one row, plain SQL. Returns when (database clock)."""
    with cluster.engine.begin() as conn:
        at: datetime = conn.execute(
            sa.text(
                "INSERT INTO sessions (world_id, user_id, location, scene_npc_ids, involved_npc_ids) "
                "VALUES (:w, 'player', 'square', CAST(:scene AS jsonb), '[]') RETURNING clock_timestamp()"
            ),
            {"w": world, "scene": f"[{npc}]"},
        ).scalar_one()
    return at


def test_a_session_inserted_with_sql_reaches_the_owners_tiers_within_a_tick(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.start(name)
    # Not before the owner is known: every world leased, both daemons listening.
    poll(lambda: all(owner for owner, _ in cluster.leases().values()), timeout=60, what="every world owned")
    poll(
        lambda: all(events(cluster, n, "change_notifications_listening") for n in "ab"),
        timeout=60,
        what="both daemons listening",
    )
    world, (owner, _) = min(cluster.leases().items())
    other = "b" if owner == "a" else "a"
    with cluster.engine.connect() as conn:
        npcs = [
            int(n)
            for n in conn.execute(
                sa.text("SELECT id FROM npcs WHERE world_id = :w ORDER BY id"), {"w": world}
            ).scalars()
        ]

    def notified(name: str) -> int:
        return len([e for e in events(cluster, name, "changes_notified") if world in e["world_ids"]])  # type: ignore[operator]

    inserted = open_session(cluster, world, npcs[0])
    latency = poll(lambda: promoted_after(cluster, npcs[0], inserted), timeout=30, what="the NPC's promotion")
    assert latency <= BOUND, f"tier changed {latency:.3f}s after the insert"
    # Both read the first notification before their connections die: one still unread on a
    # connection that is killed is lost with it (the reconnect's discovery pass covers that case).
    poll(lambda: notified(owner) >= 1 and notified(other) >= 1, timeout=30, what="both daemons notified once")

    # The listener's connection is killed: it reconnects, and the next change is as quick.
    before = listeners(cluster)
    with cluster.engine.connect() as conn:
        conn.execute(
            # This database's listeners only: another test's daemons may listen on the same server.
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :a AND datname = current_database()"
            ),
            {"a": LISTENER},
        )
    poll(lambda: len(listeners(cluster) - before) == 2, timeout=30, what="both listeners to reconnect")
    poll(
        lambda: all(events(cluster, n, "change_notifications_resumed") for n in "ab"),
        timeout=30,
        what="both daemons to report the reconnect",
    )
    moved = open_session(cluster, world, npcs[1])
    latency_after = poll(lambda: promoted_after(cluster, npcs[1], moved), timeout=30, what="the second promotion")
    assert latency_after <= BOUND, f"tier changed {latency_after:.3f}s after the insert (reconnected)"

    # Both were told of both inserts (the reconnect's discovery pass may promote before the
    # notification's line is written: wait for the line, then stop).
    poll(lambda: notified(owner) >= 2 and notified(other) >= 2, timeout=30, what="both daemons notified twice")
    assert cluster.stop_all() == {"a": 0, "b": 0}

    # Only the owner assigned tiers with the player online.
    with_player = [e for e in events(cluster, owner, "tiers_assigned") if e["world_id"] == world and e["sessions"]]
    assert len(with_player) >= 2
    assert not [e for e in events(cluster, other, "tiers_assigned") if e["world_id"] == world]
    print(f"session → tiers: {latency * 1000:.0f} ms, after a reconnect {latency_after * 1000:.0f} ms")


def test_a_stop_signal_while_waiting_for_the_first_listen_ends_the_daemon(tmp_path: Path, pg_scratch_url: str) -> None:
    """Startup waits up to ``connect_timeout_seconds`` for LISTEN; a SIGTERM meanwhile must still stop the daemon.

    A role allowed one connection: the store's pool takes it, so LISTEN (a
    connection of its own) is refused and the daemon sits in that wait.
    """
    setup = Cluster(pg_scratch_url, tmp_path)
    role = f"one_connection_{os.getpid()}"
    url = sa.engine.make_url(pg_scratch_url).set(username=role).render_as_string(hide_password=False)
    daemon = Cluster(url, tmp_path, extra_env={"SCHEDULER_DATABASE__CONNECT_TIMEOUT_SECONDS": "120"})
    try:
        setup.reset(1)
        with setup.engine.begin() as conn:
            conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1'))
            conn.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
            conn.execute(sa.text(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"'))
            conn.execute(sa.text(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
        daemon.start("a")
        poll(
            lambda: events(daemon, "a", "change_notifications_interrupted"),
            timeout=60,
            what="LISTEN to be refused",
        )
        daemon.signal("a", signal.SIGTERM)
        poll(lambda: daemon.daemons["a"].proc.poll() is not None, timeout=30, what="the daemon to exit")
        assert daemon.daemons["a"].proc.returncode == 0
        assert not events(daemon, "a", "scheduler_loop_started")
    finally:
        daemon.stop_all(timeout=5)
        with setup.engine.begin() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"), {"r": role}
            )
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        setup.engine.dispose()
        daemon.engine.dispose()
