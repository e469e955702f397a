"""Fault 7: thousands of worlds and a burst of config changes through the admin API while ticking.

5,000 worlds are registered (set-based seeding); an async HTTP client sends
config changes (``PUT /api/v1/worlds/{id}/scheduler/config``) open-loop at a
fixed rate, some with ``If-Match``, some as deliberately conflicting pairs
based on the same ETag. Afterwards, from the database and the daemon:

* **No lost change.** Every change carries a unique marker key (the config
  keeps unknown keys and merges nested objects), so the stored config holds
  the marker of every accepted (2xx) change and of no rejected one; each
  world's ``config_version`` went up exactly once per accepted change; the
  last accepted change (highest returned ETag) wins for ``timeScale`` and
  ``tickIntervalSeconds``; two changes based on the same ETag are never both
  accepted. ``412`` answers are counted separately; any 5xx or transport
  error fails the test.
* **Applied to ticking.** The daemon's view (``GET /api/v1/worlds``) equals
  the stored config, and for the short-interval worlds the committed ticks
  after their last change run at the new ``tickIntervalSeconds`` and advance
  world time at the new ``timeScale``.
* **No uncounted missed tick.** Independently of the daemon and of the audit,
  the test samples every world's committed tick count on its own monotonic
  clock and derives, per world, a lower bound of the slots that passed
  without a tick (expected slots over the window from the interval in force,
  minus committed ticks, minus the edge allowance explained in
  :func:`_observed_missed`). Their sum must not exceed the increase of
  ``worldsched_ticks_missed_total`` over the same window, plus failed ticks
  if any (a slot whose tick failed is counted as failed, not missed).
* The tick-audit invariants (``audit.check_invariants``) hold for every world.

Most worlds tick slowly (90-180 s), 50 fast (0.5-1 s): a world's tick costs
several database round trips (fence, chains, generation claims, clock), about
5 ms of daemon CPU with no NPCs on the 2-core development machine, so one
daemon sustains some 150-200 world ticks per second there and 5,000 worlds at
a 1-5 s interval (1,000-5,000 ticks/s) are far beyond it. The fast worlds
carry the per-tick checks, the slow ones the registry, discovery and
config-write load (in the CI profile their first ticks come after the burst).
Past its capacity the daemon answers fewer changes per second than asked
(the client keeps at most ``MAX_IN_FLIGHT`` requests open); the achieved rate
is recorded next to the target.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler_daemon.simulation.npc import Tier
from tests.faults.audit import WorldRules, check_invariants, read_ticks
from tests.faults.harness import (
    DaemonProcess,
    FaultDatabase,
    daemon_env,
    poll,
    profile,
    record_result,
    running_daemon,
    seed_many_worlds,
    write_config,
)
from tests.support.helpers import add_npcs_in_tiers

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

HOT_WORLDS = 50  # short intervals: the per-tick checks
HOT_INTERVALS = (0.5, 1.0)
#: Cold worlds: one of these each (the spread keeps their first ticks, which come one interval
#: after registration, from bunching); config changes pick one of the ends. Their first ticks
#: fall after the CI profile's burst; the soak profile's burst overlaps their ticking.
COLD_INTERVALS = tuple(float(s) for s in range(90, 181, 3))
COLD_CHANGE_INTERVALS = (COLD_INTERVALS[0], COLD_INTERVALS[-1])
TIME_SCALES = (30.0, 60.0, 120.0, 240.0)
SEED_SCALE = 60.0
CATCH_UP = 360.0  # >= every interval used (the config refuses less)
NPC_WORLDS = 10  # hot worlds with NPCs, so the audit also checks decision histories
NPCS = {Tier.DETAILED: 2, Tier.ACTIVE: 2}
HOT_SHARE = 0.2  # of the changes, aimed at the hot worlds (several per hot world)
INTERVAL_SHARE = 0.25  # of the changes, also change tickIntervalSeconds
PAIR_SHARE = 0.1  # of the changes, sent as two concurrent PUTs with the same If-Match
IF_MATCH_SHARE = 0.5  # of the single changes, with If-Match from the client's last known ETag
SAMPLE_EVERY = 0.5  # seconds between tick-count samples
#: Requests in flight at most: past the daemon's capacity the client slows down instead of queueing
#: requests until they time out (the achieved rate is reported next to the target).
MAX_IN_FLIGHT = 50
#: Ticks of each hot world to wait for after the burst (the applied-config check looks at them).
AFTER_BURST_TICKS = 6
MARKER = "loadChange"  # unknown config key collecting one marker per change


@dataclass
class Change:
    """One PUT of the burst and its answer (times on the test's monotonic clock)."""

    cid: int
    world: int
    body: dict[str, Any]
    if_match: str | None
    sent: float = 0.0
    done: float = 0.0
    status: int = 0  # 0: no HTTP answer (transport error)
    version: int | None = None  # from the answer's ETag
    error: str = ""
    pair: int | None = None  # cid of the other change of a conflicting pair
    launched: bool = False  # the time-bounded burst may end before every planned change went out


@dataclass
class Sample:
    """Committed tick counts of every world; the snapshot lies between ``before`` and ``after``."""

    before: float
    after: float
    ticks: dict[int, int]


@dataclass
class World:
    world_id: int
    interval: float
    hot: bool
    changes: list[Change] = field(default_factory=list)


def _version(etag: str | None) -> int | None:
    return int(etag.strip('W/"')) if etag else None


# ------------------------------------------------------------------ client
async def _put(client: httpx.AsyncClient, change: Change) -> None:
    headers = {"If-Match": change.if_match} if change.if_match is not None else {}
    change.sent = time.monotonic()
    try:
        r = await client.put(f"/api/v1/worlds/{change.world}/scheduler/config", json=change.body, headers=headers)
        change.status = r.status_code
        change.version = _version(r.headers.get("etag")) if r.is_success else None
        if not r.is_success and r.status_code != 412:
            change.error = r.text[:300]
    except httpx.HTTPError as exc:
        change.error = f"{type(exc).__name__}: {exc}"
    change.done = time.monotonic()


async def _conflicting_pair(client: httpx.AsyncClient, a: Change, b: Change) -> None:
    """Two changes based on the same, freshly read ETag: at most one may be accepted."""
    try:
        r = await client.get(f"/api/v1/worlds/{a.world}/scheduler/config")
    except httpx.HTTPError as exc:
        for c in (a, b):
            c.error = f"GET before the pair: {type(exc).__name__}: {exc}"
        return
    if r.status_code != 200:
        for c in (a, b):
            c.status, c.error = r.status_code, f"GET before the pair: {r.text[:300]}"
        return
    a.if_match = b.if_match = r.headers["etag"]
    await asyncio.gather(_put(client, a), _put(client, b))


def _plan_changes(worlds: Sequence[World], count: int, rng: random.Random) -> list[list[Change]]:
    """``count`` changes in launch groups (a single change, or a conflicting pair)."""
    hot = [w for w in worlds if w.hot]
    cold = [w for w in worlds if not w.hot]
    groups: list[list[Change]] = []
    cid = 0
    while cid < count:
        world = rng.choice(hot) if rng.random() < HOT_SHARE else rng.choice(cold)
        size = 2 if rng.random() < PAIR_SHARE and cid + 1 < count else 1
        group = []
        for _ in range(size):
            body: dict[str, Any] = {"timeScale": rng.choice(TIME_SCALES), MARKER: {f"c{cid}": cid}}
            if rng.random() < INTERVAL_SHARE:
                body["tickIntervalSeconds"] = rng.choice(HOT_INTERVALS if world.hot else COLD_CHANGE_INTERVALS)
            group.append(Change(cid, world.world_id, body, None))
            cid += 1
        if size == 2:
            group[0].pair, group[1].pair = group[1].cid, group[0].cid
        groups.append(group)
    return groups


async def _burst(
    base_url: str, groups: list[list[Change]], rate: float, seconds: float, if_match_rng: random.Random
) -> tuple[float, float]:
    """Launch the groups open-loop at ``rate`` changes per second; returns (start, end of the last answer)."""
    etags: dict[int, str] = {}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(60.0), limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []

        async def single(change: Change) -> None:
            await _put(client, change)
            if change.version is not None:
                known = _version(etags.get(change.world)) or 0
                if change.version > known:
                    etags[change.world] = f'"{change.version}"'

        permits = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def launch(group: list[Change]) -> None:
            try:
                if len(group) == 2:
                    await _conflicting_pair(client, *group)
                else:
                    await single(group[0])
            finally:
                permits.release()

        start = time.monotonic()
        launched = 0
        for group in groups:
            if time.monotonic() >= start + seconds:
                break  # past the daemon's capacity the client fell behind: the burst lasts its time, not its count
            delay = start + launched / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await permits.acquire()
            for change in group:
                change.launched = True
            if len(group) == 1 and if_match_rng.random() < IF_MATCH_SHARE:
                group[0].if_match = etags.get(group[0].world, '"1"')  # seeded worlds start at version 1
            tasks.append(asyncio.create_task(launch(group)))
            launched += len(group)
        await asyncio.gather(*tasks)
    return start, time.monotonic()


def _sample(db: FaultDatabase) -> Sample:
    before = time.monotonic()
    ticks = db.ticks()
    return Sample(before, time.monotonic(), ticks)


async def _burst_while_sampling(
    db: FaultDatabase, base_url: str, groups: list[list[Change]], rate: float, seconds: float, rng: random.Random
) -> tuple[list[Sample], float, float]:
    samples = [await asyncio.to_thread(_sample, db)]
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            await asyncio.sleep(SAMPLE_EVERY)
            samples.append(await asyncio.to_thread(_sample, db))

    task = asyncio.create_task(sampler())
    try:
        start, end = await _burst(base_url, groups, rate, seconds, rng)
    finally:
        done.set()
        await task
    samples.append(await asyncio.to_thread(_sample, db))
    return samples, start, end


# ------------------------------------------------------------------ checks
def _interval_pieces(world: World, a: float, b: float) -> tuple[list[tuple[float, float, float]], float]:
    """The interval in force over ``[a, b]`` in pieces ``(from, to, interval)``, and the edge allowance.

    A change counts from its answer: the daemon applies it before answering.
    Each interval change re-anchors the world's grid at its last tick, which
    shifts the phase by less than one slot; and it took effect somewhere
    between the request and the answer, which shifts the boundary by at most
    the request's latency. Both go into the allowance (in slots).
    """
    changes = sorted(
        (c for c in world.changes if c.version is not None and "tickIntervalSeconds" in c.body),
        key=lambda c: c.version or 0,
    )
    pieces: list[tuple[float, float, float]] = []
    allowance = 0.0
    interval, since = world.interval, a
    for c in changes:
        new = float(c.body["tickIntervalSeconds"])
        at = min(max(c.done, a), b)
        if new != interval:
            pieces.append((since, at, interval))
            allowance += 1.0 + (c.done - c.sent) / min(new, interval)
            interval, since = new, at
    pieces.append((since, b, interval))
    return pieces, allowance


def _observed_missed(world: World, first: Sample, last: Sample) -> tuple[int, float]:
    """A lower bound of the slots of ``world`` that passed without a tick between two samples.

    Without a missed slot, every slot that starts in the window at least one
    interval before its end has committed by then (the runner counts a slot
    as missed once the next one has started), so at most one slot per window
    is unaccounted for by the edges: the one in flight at the end. (A commit
    in the window that belongs to a slot before it only lowers the bound.)
    The window is taken short (the first snapshot's latest, the last one's
    earliest possible time). Returns (missed slots, expected slots).
    """
    a, b = first.after, last.before
    pieces, allowance = _interval_pieces(world, a, b)
    expected = sum((to - frm) / interval for frm, to, interval in pieces)
    committed = last.ticks.get(world.world_id, 0) - first.ticks.get(world.world_id, 0)
    return max(0, math.floor(expected - allowance) - 1 - committed), expected


def _scrape_missed(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    match = re.search(r"^worldsched_ticks_missed_total (\S+)$", text, re.MULTILINE)
    assert match, "worldsched_ticks_missed_total not in /metrics"
    return float(match.group(1))


def _scrape_failed(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    return sum(
        float(m.group(1))
        for m in re.finditer(r'^worldsched_ticks_total\{outcome="(?:error|timeout)"\} (\S+)$', text, re.MULTILINE)
    )


def _daemon_view(base_url: str) -> dict[int, Mapping[str, Any]]:
    """Every world the daemon lists, page by page (the view spans the pages' answers)."""
    out: dict[int, Mapping[str, Any]] = {}
    cursor = None
    while True:
        query = "?limit=1000" + (f"&cursor={cursor}" if cursor is not None else "")
        body = httpx.get(f"{base_url}/api/v1/worlds{query}", timeout=60).json()
        out.update((int(w["worldId"]), w) for w in body["worlds"])
        cursor = body["nextCursor"]
        if cursor is None:
            return out


def _check_changes(db: FaultDatabase, worlds: Mapping[int, World]) -> list[str]:
    """No lost change, nothing written on rejection, last accepted wins (from the database)."""
    problems: list[str] = []
    rows = db.execute("SELECT id, config_version, meta FROM worlds")
    stored = {int(r[0]): (int(r[1]), r[2]["simulation"]) for r in rows}
    for world_id, world in worlds.items():
        version, sim = stored[world_id]
        accepted = [c for c in world.changes if c.version is not None]
        markers = {int(v) for v in (sim.get(MARKER) or {}).values()}
        if version != 1 + len(accepted):
            problems.append(f"world {world_id}: config_version {version} after {len(accepted)} accepted changes")
        versions = sorted(c.version for c in accepted if c.version is not None)
        if versions != list(range(2, 2 + len(accepted))):
            problems.append(f"world {world_id}: accepted changes answered versions {versions}")
        lost = {c.cid for c in accepted} - markers
        if lost:
            problems.append(f"world {world_id}: accepted changes {sorted(lost)} are not in the stored config")
        written = markers - {c.cid for c in accepted}
        if written:
            problems.append(f"world {world_id}: rejected changes {sorted(written)} were written")
        if accepted:
            last = max(accepted, key=lambda c: c.version or 0)
            if sim.get("timeScale") != last.body["timeScale"]:
                problems.append(
                    f"world {world_id}: stored timeScale {sim.get('timeScale')} but the last accepted change "
                    f"(c{last.cid}, version {last.version}) set {last.body['timeScale']}"
                )
        if sim.get("tickIntervalSeconds") != final_interval(world):
            problems.append(
                f"world {world_id}: stored tickIntervalSeconds {sim.get('tickIntervalSeconds')}, "
                f"last accepted {final_interval(world)}"
            )
    return problems


def final_interval(world: World) -> float:
    """The tick interval of the last accepted change that set one (the seeded one if none)."""
    setting = [c for c in world.changes if c.version is not None and "tickIntervalSeconds" in c.body]
    return float(max(setting, key=lambda c: c.version or 0).body["tickIntervalSeconds"]) if setting else world.interval


def final_scale(world: World) -> float:
    accepted = [c for c in world.changes if c.version is not None]
    return float(max(accepted, key=lambda c: c.version or 0).body["timeScale"]) if accepted else SEED_SCALE


@dataclass
class View:
    """``GET /api/v1/worlds``; the daemon's snapshot lies between ``sent`` and ``received``."""

    sent: float
    received: float
    worlds: dict[int, Mapping[str, Any]]


def _view(base_url: str) -> View:
    sent = time.monotonic()
    worlds = _daemon_view(base_url)
    return View(sent, time.monotonic(), worlds)


def _slots(world: Mapping[str, Any]) -> int:
    """Grid slots the daemon went through: each is a committed, a failed or a skipped tick."""
    return int(world["ticksProcessed"]) + int(world["ticksFailed"]) + int(world["ticksSkipped"])


def _check_applied_to_ticks(
    db: FaultDatabase, hot: Sequence[World], wall_after_burst: Any, burst_end: float, views: tuple[View, View, View]
) -> list[str]:
    """After the burst each hot world's grid runs at its last interval and its ticks at its last time scale.

    The interval shows in the slots the daemon went through (committed +
    failed + skipped: an overloaded world skips slots, so commit gaps alone
    cannot tell 0.5 s from 1 s). A view counts every slot up to its time only
    once the world was dispatched after it (skipped slots are counted at the
    next dispatch, which a long tick in flight delays), so each view was
    followed by two commits of every hot world before the next one was
    taken: the first view has counted every slot before the burst's end, at
    most one slot more than passed by its own time; the last-but-one view at
    most one more than passed by its time; the settled view every slot
    before the last-but-one. Hence, in slots of the world's final interval,
    ``(last.sent - first.received) - 2 <= settled - first`` and
    ``last - first <= (last.received - burst_end) + 2``. The time scale shows
    in every tick committed wholly after the burst: world time advanced by
    real time × scale (the audit's wall stamps).
    """
    first, last, settled = views
    problems: list[str] = []
    by_world: dict[int, list[Any]] = defaultdict(list)
    for row in read_ticks(db):
        if row.old_adv is not None and row.new_adv is not None and row.old_adv >= wall_after_burst:
            by_world[row.world_id].append(row)
    shortest, longest = last.sent - first.received, last.received - burst_end
    for world in hot:
        interval, scale = final_interval(world), final_scale(world)
        base = _slots(first.worlds[world.world_id])
        at_least = _slots(settled.worlds[world.world_id]) - base
        at_most = _slots(last.worlds[world.world_id]) - base
        if at_least < shortest / interval - 2 or at_most > longest / interval + 2:
            problems.append(
                f"world {world.world_id}: {at_most}-{at_least} tick slots in {shortest:.2f}-{longest:.2f} s after "
                f"the burst, interval {interval}"
            )
        rows = by_world.get(world.world_id, [])
        if not rows:
            problems.append(f"world {world.world_id}: no tick after the burst")
        for r in rows:
            real = (r.new_adv - r.old_adv).total_seconds()
            if not math.isclose(r.delta, real * scale, rel_tol=0.02, abs_tol=0.1 * scale):
                problems.append(
                    f"world {world.world_id}: tick {r.old_ticks}->{r.new_ticks} advanced {r.delta:g} game s for "
                    f"{real:.3f} real s, expected timeScale {scale}"
                )
                break
    return problems


# -------------------------------------------------------------------- test
def _ticked(db: FaultDatabase, worlds: Sequence[int], since: Mapping[int, int], more: int) -> int:
    """How many of ``worlds`` committed at least ``more`` ticks since the counts ``since`` (one query)."""
    now = db.ticks()
    return sum(now[w] >= since.get(w, 0) + more for w in worlds)


def _wait_registered(count: int, daemon: DaemonProcess) -> None:
    # From the log, not GET /api/v1/worlds: listing 5,000 worlds costs the daemon's loop real time.
    def registered() -> bool:
        assert daemon.alive(), daemon.log_tail()
        return len(daemon.events("world_registered")) >= count

    poll(registered, timeout=240, interval=2.0, what=f"{count} worlds registered")


def test_config_burst_over_thousands_of_worlds_loses_nothing(pg_fault_db: FaultDatabase, tmp_path: Path) -> None:
    db = pg_fault_db
    prof = profile()
    seed = int(os.environ.get("SCHEDULER_FAULTS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    n_cold = prof.load_worlds - HOT_WORLDS
    shapes = [COLD_INTERVALS[i % len(COLD_INTERVALS)] for i in range(n_cold)]
    shapes += [HOT_INTERVALS[i % len(HOT_INTERVALS)] for i in range(HOT_WORLDS)]
    seeding = time.monotonic()
    # Cold worlds first: discovery registers in id order, and they start ticking only tens of seconds later.
    ids = seed_many_worlds(
        db,
        [{"timeScale": SEED_SCALE, "tickIntervalSeconds": i, "maxCatchUpSeconds": CATCH_UP} for i in shapes],
    )
    seed_seconds = time.monotonic() - seeding
    worlds = {w: World(w, i, hot=i in HOT_INTERVALS) for w, i in zip(ids, shapes, strict=True)}
    hot = [w for w in worlds.values() if w.hot]

    async def npcs(store: Any) -> None:
        for world in hot[:NPC_WORLDS]:
            await add_npcs_in_tiers(store, world.world_id, NPCS)

    db.run(npcs)
    groups = _plan_changes(list(worlds.values()), int(prof.load_rate * prof.load_seconds), rng)
    for group in groups:
        for change in group:
            worlds[change.world].changes.append(change)

    config = write_config(
        tmp_path / "config.toml",
        # The production tick timeout: the fault here is load, not a hung tick.
        # A short backoff cap bounds how long an overloaded world may pause (its slots count as missed).
        scheduler={"tick_timeout_seconds": 10.0, "discovery_interval_seconds": 1.0, "backoff_max_seconds": 5.0},
        extra="[metrics]\nper_world = false\n",
    )
    env = daemon_env(db.url, SCHEDULER_HTTP__ENABLED="true", SCHEDULER_HTTP__PORT="0")
    with running_daemon(config, env, tmp_path / "daemon.log") as daemon:
        started = time.monotonic()
        port = poll(
            lambda: next((int(e["port"]) for e in daemon.events("http_listening")), None),
            timeout=60,
            what="the HTTP port",
        )
        base_url = f"http://127.0.0.1:{port}"
        _wait_registered(len(ids), daemon)
        registered_after = time.monotonic() - started
        hot_ids = [w.world_id for w in hot]
        first = db.ticks()
        poll(
            lambda: _ticked(db, hot_ids, first, 2) == len(hot_ids),
            timeout=60,
            interval=0.2,
            what="hot worlds ticking",
        )
        missed_before = _scrape_missed(base_url)
        failed_before = _scrape_failed(base_url)
        samples, burst_start, burst_end = asyncio.run(
            _burst_while_sampling(db, base_url, groups, prof.load_rate, prof.load_seconds, random.Random(seed + 1))
        )
        wall_after_burst = db.execute("SELECT now()")[0][0]
        first_sample, last_sample = samples[0], samples[-1]
        observed = {w: _observed_missed(worlds[w], first_sample, last_sample) for w in ids}
        # Every slot missed in the window is counted at the latest when the world's next tick is
        # dispatched: wait for two more commits of each world that could show a miss at all.
        watched = [w for w, (_, expected) in observed.items() if expected >= 2]
        # Under the soak profile's long burst the cold worlds are watched too: two of their
        # intervals (up to 180 s each) must fit in the wait.
        slowest = max(
            (_interval_pieces(worlds[w], first_sample.after, last_sample.before)[0][-1][2] for w in watched),
            default=0.0,
        )
        poll(
            lambda: _ticked(db, watched, last_sample.ticks, 2) == len(watched),
            timeout=60 + 2 * slowest,
            interval=0.2,
            what="two more ticks of every watched world",
        )
        # The hot worlds' slots after the burst, for the applied-config check; two more commits
        # after a view make every slot before it counted (see _check_applied_to_ticks).
        first_view = _view(base_url)
        at_first = db.ticks()
        poll(
            lambda: _ticked(db, hot_ids, at_first, AFTER_BURST_TICKS) == len(hot_ids),
            timeout=90,
            interval=0.2,
            what="ticks of every hot world after the burst",
        )
        last_view = _view(base_url)
        at_last = db.ticks()
        poll(lambda: _ticked(db, hot_ids, at_last, 2) == len(hot_ids), timeout=60, interval=0.2, what="settling")
        settled_view = _view(base_url)
        missed_after = _scrape_missed(base_url)
        failed_after = _scrape_failed(base_url)
        view = settled_view.worlds
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    for world in worlds.values():
        world.changes = [c for c in world.changes if c.launched]
    changes = [c for g in groups for c in g if c.launched]
    by_cid = {c.cid: c for c in changes}
    statuses: dict[str, int] = defaultdict(int)
    for c in changes:
        statuses["2xx" if 200 <= c.status < 300 else str(c.status) if c.status else "transport"] += 1
    others = [c for c in changes if c.status not in (200, 412, 409)]
    both_accepted = [c for c in changes if c.pair is not None and c.pair > c.cid and c.version is not None]
    both_accepted = [c for c in both_accepted if by_cid[c.pair or 0].version is not None]
    latencies = sorted(c.done - c.sent for c in changes if c.status)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else math.nan
    observed_total = sum(m for m, _ in observed.values())
    metric_missed = missed_after - missed_before
    view_problems = [
        f"world {w}: daemon runs config version {view[w]['configVersion']} / timeScale {view[w]['timeScale']} "
        f"/ interval {view[w]['tickIntervalSeconds']}, stored {1 + sum(c.version is not None for c in world.changes)}"
        f" / {final_scale(world)} / {final_interval(world)}"
        for w, world in worlds.items()
        if w not in view
        or (view[w]["configVersion"], view[w]["timeScale"], view[w]["tickIntervalSeconds"])
        != (1 + sum(c.version is not None for c in world.changes), final_scale(world), final_interval(world))
    ]
    change_problems = _check_changes(db, worlds)
    applied_problems = _check_applied_to_ticks(
        db, hot, wall_after_burst, burst_end, (first_view, last_view, settled_view)
    )
    changed = {w for w, world in worlds.items() if any(c.version is not None for c in world.changes)}
    max_scale = max((*TIME_SCALES, SEED_SCALE))
    report = check_invariants(db, {w: WorldRules(SEED_SCALE, CATCH_UP) for w in ids if w not in changed})
    # A changed world's time scale varies: its ticks are checked for chain, counter and cap, not exact rate.
    report_changed = check_invariants(db, {w: WorldRules(max_scale, CATCH_UP) for w in changed}, exact_rate=False)
    violations = report.violations + report_changed.violations
    figures = {
        "backend": "postgres",
        "seed": seed,
        "worlds": len(ids),
        "hot_worlds": len(hot),
        "seed_seconds": round(seed_seconds, 2),
        "registered_after_seconds": round(registered_after, 1),
        "changes": len(changes),
        "rate_target": prof.load_rate,
        "rate_achieved": round(len(changes) / max(burst_end - burst_start, 1e-9), 1),
        "burst_seconds": round(burst_end - burst_start, 1),
        "statuses": dict(statuses),
        "conflict_pairs": sum(1 for c in changes if c.pair is not None) // 2,
        "latency_p99_seconds": round(p99, 3),
        "missed_observed": observed_total,
        "missed_observed_worlds": sum(1 for m, _ in observed.values() if m),
        "missed_metric": metric_missed,
        "failed_ticks_metric": failed_after - failed_before,
        "ticks_in_window": sum(last_sample.ticks[w] - first_sample.ticks[w] for w in ids),
        "window_seconds": round(last_sample.before - first_sample.after, 1),
        "violations": len(violations),
        "summary": f"{report.summary()}; changed worlds: {report_changed.summary()}",
    }
    record_result("load", **figures)
    print(figures)
    assert others == [], f"seed {seed}: {len(others)} answers neither 2xx nor 412/409, e.g. {others[:3]}"
    assert both_accepted == [], f"seed {seed}: both changes of a same-ETag pair accepted: {both_accepted[:3]}"
    assert change_problems == [], f"seed {seed}: lost or misapplied changes:\n" + "\n".join(change_problems[:50])
    # Each grid slot is committed, failed (worldsched_ticks_total{outcome="error|timeout"}) or missed.
    counted = metric_missed + figures["failed_ticks_metric"]
    assert observed_total <= counted, (
        f"seed {seed}: {observed_total} missed tick slots observed in {figures['missed_observed_worlds']} worlds, "
        f"but worldsched_ticks_missed_total rose by {metric_missed} and failed ticks by "
        f"{figures['failed_ticks_metric']}: "
        + ", ".join(f"world {w}: {m} (expected {e:.1f})" for w, (m, e) in observed.items() if m)[:2000]
    )
    assert view_problems == [], f"seed {seed}: the daemon runs another config:\n" + "\n".join(view_problems[:50])
    assert applied_problems == [], f"seed {seed}: new config not in the ticks:\n" + "\n".join(applied_problems[:50])
    assert violations == [], f"seed {seed}: " + "\n".join(violations[:50])
