"""The composition root: the object graph every entry point runs.

``build_runtime(settings, store, clock)`` wires the tick engine
(:class:`~scheduler_daemon.scheduler.WorldScheduler`), the loop
(:class:`~scheduler_daemon.runner.SchedulerLoopRunner`), and, where asked, the
metrics, the lease keeper and the admin service. The daemon, ``simulate``
(CLI) and the end-to-end benchmarks build through here, so a setting means
the same thing everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler_daemon.admin import WorldAdmin
from scheduler_daemon.change_listener import ChangeListener
from scheduler_daemon.clock import Clock
from scheduler_daemon.generation import complete_for_api, in_flight_counts
from scheduler_daemon.http.connections import ConnectionGuard
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.loop_lag import LoopLagMonitor
from scheduler_daemon.metrics import ReloadStatus, SchedulerMetrics
from scheduler_daemon.plugins import Plugins
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.settings import Settings
from scheduler_daemon.store.database import create_engine
from scheduler_daemon.store.leases import LeaseStore
from scheduler_daemon.store.notifications import ChangeNotifications
from scheduler_daemon.store.repository import Store

#: The lease keeper's own connection pool (PostgreSQL): heartbeats and renewals
#: must never queue behind ticks for a connection, or a busy daemon loses its leases.
LEASE_POOL_SIZE = 2
LEASE_POOL_OVERFLOW = 2


def database_connections(settings: Settings) -> int:
    """The most database connections a runtime built from ``settings`` opens (ticks, leases, change listener)."""
    db = settings.database
    return db.pool_size + db.max_overflow + LEASE_POOL_SIZE + LEASE_POOL_OVERFLOW + 1


@dataclass(frozen=True)
class Telemetry:
    """What the running daemon adds to its metrics besides the runtime's own sources."""

    version: str
    reload_status: ReloadStatus | None = None
    http_connections: ConnectionGuard | None = None


@dataclass
class Runtime:
    """The wired object graph; :meth:`close` releases what :func:`build_runtime` opened."""

    settings: Settings
    store: Store
    scheduler: WorldScheduler
    runner: SchedulerLoopRunner
    metrics: SchedulerMetrics | None = None
    leases: LeaseKeeper | None = None
    #: Applies the changes PostgreSQL notifies; the daemon runs it next to the runner loop.
    changes: ChangeListener | None = None
    _lease_engine: AsyncEngine | None = field(default=None, repr=False)

    def admin(self, loop_lag: LoopLagMonitor, accepting: Callable[[], bool]) -> WorldAdmin:
        """The admin service over this runtime (needs metrics)."""
        assert self.metrics is not None, "the admin service needs a runtime built with telemetry"
        return WorldAdmin(
            self.store,
            self.scheduler,
            self.runner,
            self.metrics,
            loop_lag=loop_lag,
            complete_generation=functools.partial(complete_for_api, self.store),
            accepting=accepting,
        )

    def reconfigure(self, settings: Settings) -> None:
        """Apply reloadable settings: runner limits, hand-off timeout, per-world metrics.

        New ``[defaults.simulation]`` are applied to the worlds by the caller
        (it validates them against the stored configs first).
        """
        self.settings = settings
        self.runner.set_limits(RunnerLimits.from_settings(settings.scheduler))
        self.scheduler.sink_timeout_seconds = settings.hand_off_timeout_seconds
        if self.metrics is not None:
            self.metrics.per_world = settings.metrics.per_world

    async def close(self) -> None:
        """Release the lease keeper's connections (after ``runner.shutdown()`` gave the leases back).

        The store belongs to the caller, who opened it.
        """
        if self._lease_engine is not None:
            await self._lease_engine.dispose()
            self._lease_engine = None


def build_runtime(
    settings: Settings,
    store: Store,
    clock: Clock,
    *,
    plugins: Plugins | None = None,
    limits: RunnerLimits | None = None,
    telemetry: Telemetry | None = None,
    leases: bool = False,
    notifications: bool = False,
) -> Runtime:
    """Wire scheduler and runner over ``store`` and ``clock`` from ``settings``.

    ``limits`` overrides the ``[scheduler]`` limits (``simulate`` ticks one
    batch at a time); ``telemetry`` adds metrics fed by the runner, the lease
    keeper and the generation queue; ``leases`` runs a lease keeper on its own
    small connection pool (PostgreSQL); ``notifications`` a change listener on
    a connection of its own (PostgreSQL), for the caller to run.
    """
    plugins = plugins or Plugins()
    scheduler = WorldScheduler(
        store,
        defaults=settings.defaults.simulation,
        decide_fn=plugins.decide_fn,
        sink=plugins.sink,
        sink_timeout_seconds=settings.hand_off_timeout_seconds,
    )
    keeper, lease_engine = None, None
    if leases:
        lease_engine = create_engine(
            settings.database.url,
            pool_size=LEASE_POOL_SIZE,
            max_overflow=LEASE_POOL_OVERFLOW,
            connect_timeout=settings.database.connect_timeout_seconds,
        )
        lease_store = LeaseStore(lease_engine, settings.scheduler.instance_id, settings.scheduler.lease_ttl_seconds)
        keeper = LeaseKeeper(lease_store, clock)
    runner = SchedulerLoopRunner(
        scheduler, store, clock=clock, leases=keeper, limits=limits or RunnerLimits.from_settings(settings.scheduler)
    )
    changes = None
    if notifications:
        changes = ChangeListener(
            ChangeNotifications(
                store.engine.url.render_as_string(hide_password=False),
                connect_timeout=settings.database.connect_timeout_seconds,
            ),
            runner,
        )
    metrics = None
    if telemetry is not None:
        metrics = SchedulerMetrics(
            version=telemetry.version,
            per_world=settings.metrics.per_world,
            runner=runner,
            reload_status=telemetry.reload_status,
            http_connections=telemetry.http_connections,
            leases_held=(lambda: keeper.leases_held) if keeper is not None else None,
            job_counts=lambda: in_flight_counts(store),
            changes=changes,
        )
        runner.observer = metrics
        if keeper is not None:
            keeper.observer = metrics
    return Runtime(settings, store, scheduler, runner, metrics, keeper, changes, lease_engine)
