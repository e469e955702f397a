"""Several real daemons sharing worlds through PostgreSQL leases (subprocesses, real signals).

TTL 6 s, discovery every 1 s, worlds tick every 2 s: three or four daemons
on a loaded 2-core machine must still renew comfortably inside the TTL (with
shorter TTLs a CPU-starved daemon loses leases it still wants, which is
correct and fenced, but makes the balance assertions wait on the churn). Every committed tick
is recorded by a database trigger and checked against what the daemons
report (see ``tests/support/cluster.py``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support.cluster import ROOT, Cluster, check_accounting, poll

pytestmark = [pytest.mark.postgres, pytest.mark.subprocess]

WORLDS = 30
INTERVAL = 2.0
TTL = 6.0
DISCOVERY = 1.0
#: Scheduling slack for a loaded 2-core CI machine (process start-up is not in any bound).
SLACK = 3.0


@pytest.fixture
def cluster(tmp_path: Path, pg_database_url: str) -> Iterator[Cluster]:
    c = Cluster(pg_database_url, tmp_path, ttl=TTL, discovery=DISCOVERY)
    try:
        c.reset(WORLDS, tick_interval=INTERVAL)
        yield c
    finally:
        c.close()


def balanced(cluster: Cluster, names: list[str], share: int) -> bool:
    owners = cluster.owners()
    return set(owners) == set(names) and sum(owners.values()) == WORLDS and max(owners.values()) <= share


def test_three_daemons_split_the_worlds_and_a_fourth_rebalances_without_stalls(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    poll(lambda: balanced(cluster, ["a", "b", "c"], 10), timeout=120, what="10 worlds per daemon")

    joined_at = cluster.db_now()
    cluster.start("d")
    poll(lambda: balanced(cluster, ["a", "b", "c", "d"], 8), timeout=120, what="four-way split")
    settled_at = cluster.db_now()
    # Let every world tick a few more times under the new owners.
    poll(lambda: cluster.db_now() > settled_at + timedelta(seconds=3 * INTERVAL), timeout=30, what="3 s")
    codes = cluster.stop_all()
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}

    figures = check_accounting(cluster)  # no kills: every committed tick reported exactly once
    assert figures["unreported"] == 0
    assert figures["per_world_reported"] == figures["final"]
    assert cluster.owners() == {}  # clean stops released every lease

    # No world stood still longer than one interval plus the hand-over
    # (the newcomer's discovery interval) while it moved to the newcomer.
    gaps: dict[int, float] = {}
    last: dict[int, object] = {}
    moved = set()
    for world, _, _, owner, _, at in cluster.audit():
        if at >= joined_at and world in last:
            gaps[world] = max(gaps.get(world, 0.0), (at - last[world]).total_seconds())  # type: ignore[operator]
        if owner == "d":
            moved.add(world)
        last[world] = at
    assert len(moved) >= 6
    worst = max(gaps.values())
    assert worst <= INTERVAL + DISCOVERY + SLACK, f"worst stall {worst:.2f}s"
    print(f"rebalance: {len(moved)} worlds moved to the newcomer; longest stall {worst:.2f}s")


def test_sigkilled_daemon_worlds_resume_on_the_others_within_ttl_plus_discovery(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    poll(lambda: balanced(cluster, ["a", "b", "c"], 10), timeout=120, what="10 worlds per daemon")
    victim = {w for w, (owner, _) in cluster.leases().items() if owner == "b"}
    killed_at = cluster.db_now()
    cluster.signal("b", signal.SIGKILL)
    cluster.daemons["b"].proc.wait(timeout=10)

    def resumed() -> dict[int, float] | None:
        first: dict[int, float] = {}
        for world, _, _, owner, _, at in cluster.audit():
            if world in victim and owner != "b" and at > killed_at and world not in first:
                first[world] = (at - killed_at).total_seconds()
        return first if set(first) == victim else None

    first = poll(resumed, timeout=30, what="the killed daemon's worlds to tick elsewhere")
    worst = max(first.values())
    assert worst <= TTL + DISCOVERY + INTERVAL + SLACK, f"slowest world resumed after {worst:.2f}s"
    poll(lambda: balanced(cluster, ["a", "c"], 15), timeout=30, what="15 worlds each")
    assert cluster.stop_all() == {"a": 0, "b": -signal.SIGKILL, "c": 0}
    figures = check_accounting(cluster, killed=["b"])
    assert figures["unreported"] <= len(victim)
    print(f"failover: {len(victim)} worlds resumed, slowest after {worst:.2f}s")


def test_daemon_paused_past_its_ttl_writes_nothing_for_lost_worlds_and_rejoins(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    poll(lambda: balanced(cluster, ["a", "b", "c"], 10), timeout=120, what="10 worlds per daemon")
    cluster.signal("c", signal.SIGSTOP)
    held = {w: epoch for w, (owner, epoch) in cluster.leases().items() if owner == "c"}
    poll(
        lambda: all(cluster.leases()[w][1] > e for w, e in held.items()),
        timeout=30,
        what="the paused daemon's worlds to be claimed by the others",
    )
    ticks_at_takeover = cluster.world_ticks()
    cluster.signal("c", signal.SIGCONT)
    # It notices, drops the lost worlds, and gets its share back as the others shed.
    poll(lambda: balanced(cluster, ["a", "b", "c"], 10), timeout=60, what="c to rejoin with 10 worlds")
    poll(
        lambda: sum(1 for e in cluster.log_events("c") if e.get("event") == "tick" and e["lease_epoch"] > 1) >= 10,
        timeout=30,
        what="c ticking under new leases",
    )
    assert cluster.stop_all() == {"a": 0, "b": 0, "c": 0}

    audit = cluster.audit()
    for world, old_epoch in held.items():
        # Nothing committed under c's old lease once the world had been taken over.
        late = [n for w, n, _, owner, epoch, _ in audit if w == world and epoch == old_epoch and owner == "c"]
        assert all(n <= ticks_at_takeover[world] for n in late), (world, late)
    lost = [e for e in cluster.log_events("c") if e.get("event") == "lease_lost"]
    assert set(held) <= {e["world_id"] for e in lost}
    check_accounting(cluster)


def test_second_daemon_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    env = Cluster.env(Cluster("sqlite://", tmp_path), "solo")  # the env builder only
    env["SCHEDULER_DATABASE__URL"] = f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}"
    env["SCHEDULER_LOGGING__LEVEL"] = "INFO"
    run = [sys.executable, "-m", "scheduler_daemon"]
    assert subprocess.run([*run, "db", "upgrade"], env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen([*run, "run"], env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        poll(lambda: '"event": "ready"' in log.read_text(), timeout=30, what="the first daemon to be ready")
        second = subprocess.run([*run, "run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 6, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert "already running on the SQLite database" in last and "use PostgreSQL" in last
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one is unaffected
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
