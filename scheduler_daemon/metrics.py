"""Prometheus metrics (prefix ``worldsched_``), served at ``/metrics``.

Two sources feed one :class:`~prometheus_client.CollectorRegistry` per daemon:

* events: :class:`SchedulerMetrics` implements the runner's
  :class:`~scheduler_daemon.runner.TickObserver` (ticks, misses, NPC decisions,
  job hand-offs, chain steps, database errors, per-world counters);
* state read at scrape time by a collector (worlds by state, world time, NPCs
  per tier, decision lag, reload status, the HTTP connection guard's counters,
  and the optional providers below).

Histograms carry no per-world label (cardinality); every series with a
``world_id`` label (world time, the per-world counters) is switched off with
``[metrics] per_world = false``. ``/metrics`` renders the registry through
:mod:`~scheduler_daemon.metrics_exposition` (format by ``Accept``, gzip, no
``_created`` series).

Sources owned elsewhere are handed in at construction: ``job_counts``
(generation requests per status, an async count that ``/metrics`` awaits
through :meth:`SchedulerMetrics.refresh` before rendering) and ``leases_held``;
without one its family is exported without samples rather than with made-up
zeros. The lease counters are incremented through :meth:`SchedulerMetrics.lease_claimed`
and :meth:`SchedulerMetrics.lease_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from scheduler_daemon.metrics_exposition import Snapshot, WithoutCreated
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, Tier

if TYPE_CHECKING:
    from scheduler_daemon.change_listener import ChangeListener
    from scheduler_daemon.http.connections import ConnectionGuard
    from scheduler_daemon.runner import SchedulerLoopRunner
    from scheduler_daemon.scheduler import TickResult

#: The world states of ``worldsched_worlds`` (isolated: not ticking, its stored row, config or behaviour is invalid).
WORLD_STATES = ("running", "paused", "failing", "isolated")
#: Tick outcomes of ``worldsched_ticks_total``.
TICK_OUTCOMES = ("ok", "error", "timeout")

# Worlds tick every 0.01 … 3600 s, 1 s by default: the buckets resolve the
# interesting band around a default interval (1 ms … 10 s) and keep a few
# coarse ones for slow worlds and stalls. 0.1/0.5/1/2.5 are used by alerts.
TICK_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TICK_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Recent regular ticks kept per world for the admin API's tick rate and p99 lag (not exported).
RECENT_TICKS = 200

#: How long ``/metrics`` waits for the refreshers (a scrape must stay fast).
REFRESH_TIMEOUT_SECONDS = 2.0

#: Reload status: (last reload succeeded, wall time of the last success or None).
ReloadStatus = Callable[[], tuple[bool, float | None]]


class _StateCollector(Collector):
    """Gauges computed from the runner's worlds at scrape time."""

    def __init__(self, metrics: SchedulerMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._worlds()
        yield from self._reload()
        yield from self._providers()
        yield from self._http()

    def _worlds(self) -> Iterator[Metric]:
        m = self._m
        worlds = GaugeMetricFamily(
            "worldsched_worlds", "Worlds registered with this daemon, by state", labels=["state"]
        )
        world_time = GaugeMetricFamily(
            "worldsched_world_time_seconds",
            "Committed world time (game seconds since the world's epoch, 0 = Monday 00:00; [metrics] per_world)",
            labels=["world_id"],
        )
        npcs = GaugeMetricFamily(
            "worldsched_npcs", "NPCs of the registered worlds per tier (frozen = past every capacity)", labels=["tier"]
        )
        lag = GaugeMetricFamily(
            "worldsched_npc_decision_lag_seconds",
            "Largest game-time lag of an NPC decision in the last tick, over all worlds, per tier",
            labels=["tier"],
        )
        quarantined = GaugeMetricFamily(
            "worldsched_quarantined_rows",
            "Rows of the registered worlds that cannot be read (NPCs kept frozen, sessions left out of tiering)",
            labels=["table"],
        )
        states = dict.fromkeys(WORLD_STATES, 0)
        population = dict.fromkeys(Tier, 0)
        max_lag: dict[Tier, float] = {}
        bad_npcs = bad_sessions = 0
        runner = m.runner
        if runner is not None:
            for world_id, ctx in sorted(runner.scheduler.get_all_contexts().items()):
                states[ctx.state] = states.get(ctx.state, 0) + 1
                if m.per_world:
                    world_time.add_metric([str(world_id)], ctx.current_world_time)
                for tier, count in ctx.tier_population.items():
                    population[tier] = population.get(tier, 0) + count
                for tier, value in ctx.decision_lag_per_tier.items():
                    max_lag[tier] = max(max_lag.get(tier, 0.0), value)
                bad_npcs += len(ctx.quarantined_npcs)
            states["isolated"] = len(runner.broken)
            bad_sessions = runner.scheduler.ignored_sessions
        quarantined.add_metric(["npcs"], bad_npcs)
        quarantined.add_metric(["sessions"], bad_sessions)
        for state, count in states.items():
            worlds.add_metric([state], count)
        for tier in Tier:
            npcs.add_metric([tier.label], population.get(tier, 0))
        for tier in SIMULATED_TIERS:
            lag.add_metric([tier.label], max_lag.get(tier, 0.0))
        yield worlds
        yield world_time
        yield npcs
        yield lag
        yield quarantined
        if runner is not None:
            yield GaugeMetricFamily(
                "worldsched_phase_slot_seconds",
                "Phase slot width: worlds of equal interval due within one slot tick together (at most 1/8 interval)",
                value=runner.limits.phase_slot_seconds,
            )

    def _reload(self) -> Iterator[Metric]:
        m = self._m
        ok, success_at = m.reload_status() if m.reload_status is not None else (True, None)
        yield GaugeMetricFamily(
            "worldsched_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded, else 0 (the previous configuration keeps running)",
            value=1 if ok else 0,
        )
        stamp = GaugeMetricFamily(
            "worldsched_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration (re)load",
        )
        if success_at is not None:
            stamp.add_metric([], success_at)
        yield stamp

    def _providers(self) -> Iterator[Metric]:
        m = self._m
        jobs = GaugeMetricFamily("worldsched_jobs", "Generation requests by status", labels=["status"])
        if m.job_counts is not None:
            counts = m.job_counts
            # Only what the provider counted (the live queue): a finished status
            # it does not count must not read as 0.
            for status in sorted(counts):
                jobs.add_metric([status], counts[status])
        yield jobs

        held = GaugeMetricFamily("worldsched_leases_held", "World leases this daemon holds")
        if m.leases_held is not None:
            held.add_metric([], m.leases_held())
        yield held
        yield from self._changes()

    def _changes(self) -> Iterator[Metric]:
        m = self._m
        applied = CounterMetricFamily(
            "worldsched_world_changes_applied",
            "Registered worlds whose changes were applied before their next tick (API writes, change notifications)",
        )
        if m.runner is not None:
            applied.add_metric([], m.runner.changes_applied)
        yield applied
        notified = CounterMetricFamily(
            "worldsched_change_notifications", "Change notifications received (PostgreSQL LISTEN/NOTIFY)"
        )
        up = GaugeMetricFamily(
            "worldsched_change_listener_up", "1 while the change notifications connection listens, else 0"
        )
        if m.changes is not None:
            notified.add_metric([], m.changes.received)
            up.add_metric([], 1 if m.changes.listening.is_set() else 0)
        yield notified
        yield up

    def _http(self) -> Iterator[Metric]:
        yield from http_connection_families(self._m.http_connections)


def http_connection_families(guard: ConnectionGuard | None) -> Iterator[Metric]:
    """The HTTP port's connection figures (``worldsched_http_*``); families without samples without a guard."""
    connections = GaugeMetricFamily("worldsched_http_connections", "Open connections to the HTTP port")
    closed = CounterMetricFamily(
        "worldsched_http_connections_closed",
        "HTTP connections the guard closed: timeout (no response started within http.request_timeout_seconds), "
        "evicted (idle, for a new connection), refused (new, with every open connection busy)",
        labels=["reason"],
    )
    accept_errors = CounterMetricFamily(
        "worldsched_http_accept_errors", "accept() failures on the HTTP port for lack of file descriptors or memory"
    )
    if guard is not None:
        connections.add_metric([], guard.open_connections)
        for reason, count in guard.closed.items():
            closed.add_metric([reason], count)
        accept_errors.add_metric([], guard.accept_errors)
    yield connections
    yield closed
    yield accept_errors


class SchedulerMetrics:
    """The daemon's metrics; attach as the runner's observer.

    Every data source is handed in at construction and read at scrape time:
    ``runner``, ``http_connections`` (the HTTP server's connection guard),
    ``reload_status``, ``leases_held``, ``changes`` (the change listener, PostgreSQL),
    and ``job_counts``, an async count
    refreshed before each render (see the module docstring).
    """

    def __init__(
        self,
        *,
        version: str,
        per_world: bool = True,
        runner: SchedulerLoopRunner | None = None,
        reload_status: ReloadStatus | None = None,
        http_connections: ConnectionGuard | None = None,
        leases_held: Callable[[], int] | None = None,
        job_counts: Callable[[], Awaitable[Mapping[str, int]]] | None = None,
        changes: ChangeListener | None = None,
        registry: CollectorRegistry | None = None,
        process_collectors: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.runner = runner
        self.reload_status = reload_status
        self.http_connections = http_connections
        self.leases_held = leases_held
        self.changes = changes
        self.count_jobs = job_counts
        #: The last counts ``job_counts`` returned (a failed refresh keeps them).
        self.job_counts: dict[str, int] | None = None
        self._per_world = per_world
        # world id -> (finish time, lag) of its recent regular ticks.
        self._recent: dict[int, deque[tuple[float, float]]] = {}
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            # The default GC collector is bound to the global registry; ours gets its own.
            GCCollector(registry=self.registry)
        r = self.registry
        build = Gauge("worldsched_build_info", "Version of the running daemon (always 1)", ["version"], registry=r)
        build.labels(version=version).set(1)
        self.ticks = Counter("worldsched_ticks", "Ticks finished, by outcome", ["outcome"], registry=r)
        self._tick_children = {outcome: self.ticks.labels(outcome=outcome) for outcome in TICK_OUTCOMES}
        self.missed = Counter(
            "worldsched_ticks_missed",
            "Tick slots skipped because the previous tick or the loop ran late, or the world was backed off",
            registry=r,
        )
        self.tick_duration = Histogram(
            "worldsched_tick_duration_seconds",
            "Wall time of one tick (load, decide, commit), all worlds",
            buckets=TICK_DURATION_BUCKETS,
            registry=r,
        )
        self.tick_lag = Histogram(
            "worldsched_tick_lag_seconds",
            "How late a tick started after its scheduled slot, all worlds",
            buckets=TICK_LAG_BUCKETS,
            registry=r,
        )
        self.npc_ticks = Counter("worldsched_npc_ticks", "NPC decisions committed, per tier", ["tier"], registry=r)
        self._npc_children = {tier.label: self.npc_ticks.labels(tier=tier.label) for tier in SIMULATED_TIERS}
        self.jobs_enqueued = Counter(
            "worldsched_jobs_enqueued", "Generation requests handed to workers by ticks", registry=r
        )
        self.chain_steps = Counter("worldsched_chain_steps", "Interaction chain steps advanced by ticks", registry=r)
        self.db_errors = Counter(
            "worldsched_db_errors", "Database errors (failed ticks, discovery, readiness checks)", registry=r
        )
        self.lease_claims = Counter("worldsched_lease_claims", "World leases claimed by this daemon", registry=r)
        self.lease_lost_total = Counter(
            "worldsched_lease_lost", "World leases lost (fencing refused a write or renewal failed)", registry=r
        )
        self.world_ticks = Counter(
            "worldsched_world_ticks", "Committed ticks per world ([metrics] per_world)", ["world_id"], registry=r
        )
        self.world_npc_ticks = Counter(
            "worldsched_world_npc_ticks",
            "NPC decisions per world and tier ([metrics] per_world)",
            ["world_id", "tier"],
            registry=r,
        )
        r.register(_StateCollector(self))
        self._view = WithoutCreated(r)

    # ------------------------------------------------------------ settings
    @property
    def per_world(self) -> bool:
        return self._per_world

    @per_world.setter
    def per_world(self, value: bool) -> None:
        """Switch per-world series on or off (SIGHUP); off drops the existing ones, on starts them at 0."""
        if not value:
            self.world_ticks.clear()
            self.world_npc_ticks.clear()
        elif not self._per_world and self.runner is not None:
            # As at registration: a series first seen at 1 would hide its first tick from rate().
            for world_id in self.runner.scheduler.get_all_contexts():
                self.world_ticks.labels(world_id=str(world_id))
        self._per_world = value

    # ------------------------------------------------------- TickObserver
    def tick_finished(
        self, world_id: int, outcome: str, lag_seconds: float, duration_seconds: float, result: TickResult | None
    ) -> None:
        """Count a finished tick (any outcome) and what it did."""
        # Children are cached: this runs once per tick of every world.
        ticks = self._tick_children.get(outcome)
        if ticks is None:
            ticks = self._tick_children[outcome] = self.ticks.labels(outcome=outcome)
        ticks.inc()
        if math.isfinite(lag_seconds):
            self.tick_lag.observe(max(lag_seconds, 0.0))
            if outcome == "ok":
                recent = self._recent.get(world_id)
                if recent is None:
                    recent = self._recent[world_id] = deque(maxlen=RECENT_TICKS)
                recent.append((self._now(), max(lag_seconds, 0.0)))
        if math.isfinite(duration_seconds):
            self.tick_duration.observe(max(duration_seconds, 0.0))
        if result is None:
            return
        for tier, count in result.npcs_per_tier.items():
            if count:
                npc = self._npc_children.get(tier)
                if npc is None:
                    npc = self._npc_children[tier] = self.npc_ticks.labels(tier=tier)
                npc.inc(count)
        if result.jobs_enqueued:
            self.jobs_enqueued.inc(result.jobs_enqueued)
        if result.chain_steps:
            self.chain_steps.inc(result.chain_steps)
        if self._per_world:
            wid = str(world_id)
            self.world_ticks.labels(wid).inc()
            for tier, count in result.npcs_per_tier.items():
                if count:
                    self.world_npc_ticks.labels(wid, tier).inc(count)

    def ticks_missed(self, world_id: int, slots: int) -> None:
        """Count tick slots that passed without a tick."""
        self.missed.inc(slots)

    def world_registered(self, world_id: int) -> None:
        """Create the world's per-world series at 0 so rates start from registration."""
        if self._per_world:
            self.world_ticks.labels(world_id=str(world_id))

    def world_unregistered(self, world_id: int) -> None:
        """Drop the world's per-world series (no stale series for worlds gone elsewhere)."""
        self._recent.pop(world_id, None)
        wid = str(world_id)
        with contextlib.suppress(KeyError):
            self.world_ticks.remove(wid)
        for tier in SIMULATED_TIERS:
            with contextlib.suppress(KeyError):
                self.world_npc_ticks.remove(wid, tier.label)

    def db_error(self, operation: str) -> None:
        """Count a database error (``operation`` names where it happened; not a label)."""
        self.db_errors.inc()

    # --------------------------------------------------------------- leases
    def lease_claimed(self, world_id: int) -> None:
        """Count a lease this daemon claimed."""
        self.lease_claims.inc()

    def lease_lost(self, world_id: int) -> None:
        """Count a lease this daemon lost."""
        self.lease_lost_total.inc()

    # --------------------------------------------------------- per-world view
    def _now(self) -> float:
        return self.runner.clock.now() if self.runner is not None else time.monotonic()

    def recent_tick_stats(self, world_id: int) -> tuple[float | None, float | None]:
        """(ticks per second, p99 start lag in seconds) over the world's recent regular ticks.

        For the admin API and ``top``; ``None`` until there are enough ticks.
        """
        recent = self._recent.get(world_id)
        if not recent:
            return None, None
        # Nearest-rank p99: the k-th largest, k = n - ceil(0.99 n) + 1 (a few), without sorting all n.
        n = len(recent)
        p99 = heapq.nlargest(n - min(n - 1, math.ceil(0.99 * n) - 1), (lag for _, lag in recent))[-1]
        if len(recent) < 2:
            return None, p99
        # Ticks per second up to now, so a world that stopped ticking decays.
        span = self._now() - recent[0][0]
        rate = (len(recent) - 1) / span if span > 0 else None
        return rate, p99

    # ------------------------------------------------------------ refresh
    async def refresh(self) -> None:
        """Refresh the values read from the database, bounded; a failure keeps the previous values."""
        if self.count_jobs is None:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                self.job_counts = dict(await self.count_jobs())
        except Exception:
            self.db_error("metrics refresh")

    # ---------------------------------------------------------------- output
    def snapshot(self) -> Snapshot:
        """Every metric's samples now; reads the runner's worlds, so on the loop (rendering need not be)."""
        return Snapshot(list(self._view.collect()))
