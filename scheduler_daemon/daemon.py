"""Daemon lifecycle: connect, check schema, run the loop, handle signals, stop cleanly.

Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP reloads the
settings file (bursts coalesce into one reload). systemd is told about every
state change over ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import gc
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler_daemon.clock import MonotonicClock
from scheduler_daemon.http import (
    AdminBackend,
    HttpBindError,
    HttpServer,
    LoopLagMonitor,
    bind_socket,
    check_bind_allowed,
    create_app,
    load_admin_token,
    token_path,
)
from scheduler_daemon.http_connections import (
    ACCEPT_PIPELINE_FDS,
    AcceptErrorHandler,
    ConnectionGuard,
    fit_connection_limit,
    raise_open_files_limit,
)
from scheduler_daemon.jobs import complete_for_api, in_flight_counts, load_sink
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.logs import configure_logging
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.retry import first_line, retry_transient
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.settings import HttpSettings, Settings, SettingsError, load_settings, restart_only_changes
from scheduler_daemon.simulation.behavior import load_decide_fn
from scheduler_daemon.store.database import create_engine
from scheduler_daemon.store.leases import LeaseStore
from scheduler_daemon.store.migrate import SchemaNotMigratedError
from scheduler_daemon.store.repository import Store
from scheduler_daemon.systemd import SystemdNotifier, watchdog_interval_seconds, watchdog_loop
from scheduler_daemon.world_config import WorldConfigError, parse_world_config

log = structlog.get_logger("scheduler_daemon.daemon")

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_NOT_MIGRATED = 4
EXIT_ADDRESS_IN_USE = 5
EXIT_ALREADY_RUNNING = 6

#: SIGHUPs arriving this soon after the first join its reload (``for f in …; kill -HUP``).
RELOAD_SETTLE_SECONDS = 0.2
#: While the first discovery registers worlds: report progress this often, and
#: ask systemd for this much more start-up time whenever registration moved.
STARTUP_REPORT_SECONDS = 2.0
STARTUP_EXTEND_SECONDS = 30.0
#: How often ``STATUS=`` is refreshed for ``systemctl status``.
STATUS_INTERVAL_SECONDS = 5.0
#: The lease keeper's own connection pool (PostgreSQL).
LEASE_POOL_SIZE = 2
LEASE_POOL_OVERFLOW = 2
#: Open files the daemon needs besides HTTP connections, database pools and accepting:
#: log, SQLite files, epoll, signal and notify sockets, the interpreter's own.
OTHER_OPEN_FILES = 64


class StartupError(RuntimeError):
    """A startup failure with a one-line reason and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def lock_sqlite_database(url: str) -> int | None:
    """Hold an exclusive ``flock`` on ``<database>.lock`` for the life of the process.

    SQLite is single-instance: leases need PostgreSQL. Returns the lock's
    file descriptor (keep it open; the kernel releases the lock when the
    process exits, however it exits), or ``None`` for non-file databases.
    """
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not url.startswith("sqlite") or not database or database == ":memory:" or database.startswith("file:"):
        return None
    # The real file, not the spelling of its path: a symlink or a relative
    # path to the same database must find the same lock.
    database = str(Path(database).resolve())
    lock_path = f"{database}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create lock file {lock_path}: {exc.strerror or exc}", EXIT_DATABASE) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another scheduler-daemon is already running on the SQLite database {database} "
            f"(it holds {lock_path}); SQLite is single-instance, use PostgreSQL to run several daemons",
            EXIT_ALREADY_RUNNING,
        ) from None
    return fd


class Daemon:
    """The running daemon: settings, store, scheduler, runner, signals, systemd.

    Reload state for the metrics (``worldsched_config_last_reload_*``) lives in
    :attr:`last_reload_ok` and :attr:`last_reload_success_at`; the settings the
    daemon started with count as the first successful load.
    """

    def __init__(self, settings: Settings, config_path: Path | None, *, config_required: bool = True) -> None:
        self.settings = settings
        self.config_path = config_path
        self.config_required = config_required
        self.notifier = SystemdNotifier()
        self.store: Store | None = None
        self.scheduler: WorldScheduler | None = None
        self.runner: SchedulerLoopRunner | None = None
        self.leases: LeaseKeeper | None = None
        self._sqlite_lock_fd: int | None = None
        self._lease_engine: AsyncEngine | None = None
        self.started_monotonic = time.monotonic()
        self.reload_count = 0
        self.last_reload_ok = True
        self.last_reload_error: str | None = None
        self.last_reload_success_at = time.time()  # wall time, for humans/metrics
        #: Restart-only keys whose new value is waiting for a restart.
        self.restart_pending: list[str] = []
        self.metrics: SchedulerMetrics | None = None
        self.admin_token: str | None = None
        self._stop_requested = 0
        self._stopping_sent = False
        self._reload_event = asyncio.Event()

    # --------------------------------------------------------------- startup
    async def _connect(self) -> Store:
        db = self.settings.database
        store = Store.from_url(
            db.url,
            pool_size=db.pool_size,
            max_overflow=db.max_overflow,
            connect_timeout=db.connect_timeout_seconds,
            # Bound how long a frozen daemon's open tick transaction can keep a
            # world's row locked against a new owner: no longer than a tick may take.
            idle_in_transaction_timeout=max(
                self.settings.scheduler.lease_ttl_seconds, self.settings.scheduler.tick_timeout_seconds
            )
            if db.url.startswith("postgresql")
            else None,
        )

        async def connect_and_check() -> None:
            await store.ping()
            await store.check_schema()

        try:
            await retry_transient("database connection", connect_and_check, max_seconds=db.connect_retry_seconds)
        except SchemaNotMigratedError as exc:
            await store.dispose()
            raise StartupError(str(exc), EXIT_NOT_MIGRATED) from None
        except Exception as exc:
            await store.dispose()
            raise StartupError(
                f"database unreachable after {db.connect_retry_seconds:g}s of retries "
                f"(database.connect_retry_seconds): {first_line(exc)}",
                EXIT_DATABASE,
            ) from None
        return store

    async def run(self) -> int:
        """Run until stopped by a signal; returns the process exit code.

        Raises :class:`StartupError` (one-line reason, exit code) when the
        daemon cannot start. A stop signal during startup ends the process
        with the signal's default action.
        """
        s = self.settings
        log.info("starting", version=_version(), database=_redact(s.database.url), instance_id=s.scheduler.instance_id)
        if self.config_path is not None and not self.config_path.exists() and not self.config_required:
            log.warning("no config file, using defaults and environment", path=str(self.config_path))
        loop = asyncio.get_running_loop()
        # From here a SIGHUP is never fatal: it waits for the reload loop.
        loop.add_signal_handler(signal.SIGHUP, self._reload_event.set)
        try:
            return await self._run(loop)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        s = self.settings
        warn_about_permissions(self.config_path, s.http if s.http.enabled else None)
        try:
            decide_fn = load_decide_fn(s.scheduler.behavior)
        except ValueError as exc:
            raise StartupError(f"scheduler.behavior: {exc}", EXIT_CONFIG) from None
        try:
            sink = load_sink(s.generation.sink)
        except ValueError as exc:
            raise StartupError(f"generation.sink: {exc}", EXIT_CONFIG) from None
        # HTTP: validate the token and bind the port before anything slow, so a
        # bad token file or a port in use fails at once with one line.
        self.admin_token = self._load_token(s)
        open_files = _raise_open_files_limit()
        guard = _connection_guard(s, open_files) if s.http.enabled else None
        sock = self._bind_http(s) if s.http.enabled else None
        try:
            self._sqlite_lock_fd = lock_sqlite_database(s.database.url)
            self.store = await self._connect()
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.scheduler = WorldScheduler(
            self.store,
            defaults=s.defaults.simulation,
            decide_fn=decide_fn,
            sink=sink,
            sink_timeout_seconds=s.hand_off_timeout_seconds,
        )
        self.metrics = SchedulerMetrics(
            version=_version(),
            per_world=s.metrics.per_world,
            reload_status=self._reload_status,
            http_connections=guard,
        )
        # worldsched_jobs{status}: one grouped count per scrape, cached for the collector.
        job_counts: dict[str, int] = {}
        store = self.store

        async def refresh_job_counts() -> None:
            job_counts.update(await in_flight_counts(store))

        self.metrics.job_counts = lambda: job_counts
        self.metrics.add_refresher(refresh_job_counts)
        clock = MonotonicClock()
        if self.store.dialect == "postgresql":
            # Always lease on PostgreSQL, so starting another daemon is all it takes to scale out.
            # Heartbeats and renewals get their own small pool: they must never
            # queue behind ticks for a connection, or a busy daemon loses its leases.
            self._lease_engine = create_engine(
                s.database.url,
                pool_size=LEASE_POOL_SIZE,
                max_overflow=LEASE_POOL_OVERFLOW,
                connect_timeout=s.database.connect_timeout_seconds,
            )
            self.leases = LeaseKeeper(
                LeaseStore(self._lease_engine, s.scheduler.instance_id, s.scheduler.lease_ttl_seconds), clock
            )
            keeper = self.leases
            keeper.observer = self.metrics
            self.metrics.leases_held = lambda: keeper.leases_held
        self.runner = SchedulerLoopRunner(
            self.scheduler,
            clock=clock,
            leases=self.leases,
            max_concurrent_ticks=s.scheduler.max_concurrent_ticks,
            max_batch_size=s.scheduler.max_batch_size,
            batch_window_seconds=s.scheduler.batch_window_seconds,
            tick_timeout_seconds=s.scheduler.tick_timeout_seconds,
            discovery_interval_seconds=s.scheduler.discovery_interval_seconds,
            backoff_max_seconds=s.scheduler.backoff_max_seconds,
            tier_refresh_max_seconds=s.scheduler.tier_refresh_max_seconds,
            observer=self.metrics,
        )
        self.metrics.runner = self.runner
        _warn_if_pool_too_small(s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        background: list[asyncio.Task[Any]] = [asyncio.create_task(self._reload_loop(), name="reload")]
        wd = watchdog_interval_seconds()
        if wd is not None and self.notifier.enabled:
            # The loop must show progress within every watchdog interval even when idle.
            self.runner.idle_wake_seconds = min(self.runner.idle_wake_seconds, wd / 2)
            runner = self.runner
            background.append(asyncio.create_task(watchdog_loop(self.notifier, wd, lambda: runner.progress)))
        background.append(asyncio.create_task(self._status_loop(), name="status"))
        background.append(asyncio.create_task(self._activity_loop(), name="activity-summary"))
        lag_monitor = LoopLagMonitor()
        lag_monitor.start()
        http_server: HttpServer | None = None
        runner_task: asyncio.Task[None] | None = None
        accept_errors = AcceptErrorHandler(guard) if guard is not None else None
        if accept_errors is not None:
            accept_errors.install(loop)
        try:
            if sock is not None:
                assert guard is not None
                # Serving before READY=1: the port is bound and answering when systemd counts us up.
                http_server = await self._start_http(sock, guard, lag_monitor)
                sock = None
            runner_task = asyncio.create_task(self.runner.start(), name="runner")
            if await self._serving(runner_task):
                # What startup built (modules, settings, the first discovery's
                # worlds) lives as long as the process: frozen out of the
                # collector's way, a full collection at 10,000 worlds took 1 ms
                # instead of 160 ms, a stall every tick due meanwhile waited on.
                gc.collect()
                gc.freeze()
                self.notifier.ready(status=self._status_line())
                log.info("ready", worlds=len(self.runner.world_ids))
            await runner_task
        finally:
            self._notify_stopping()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if runner_task is not None and not runner_task.done():  # startup failed after the runner started
                self.runner.stop()
                await asyncio.gather(runner_task, return_exceptions=True)
            await self.runner.shutdown()
            if http_server is not None:
                await http_server.stop()
            if accept_errors is not None:
                accept_errors.uninstall(loop)
            if sock is not None:
                sock.close()
            await lag_monitor.stop()
            await self.store.dispose()
            if self._lease_engine is not None:
                await self._lease_engine.dispose()
            if self._sqlite_lock_fd is not None:
                os.close(self._sqlite_lock_fd)
                self._sqlite_lock_fd = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_OK

    async def _serving(self, runner_task: asyncio.Task[None]) -> bool:
        """Wait until the daemon serves: migrated and connected (done), worlds discovered.

        READY=1 follows this, so whatever must serve before systemd counts the
        daemon as up is serving when it returns: the admin HTTP port is bound
        before the database connect (a port in use fails the start at once,
        ``StartupError`` EXIT_ADDRESS_IN_USE) and answers before the runner
        starts. Returns False if the daemon stopped meanwhile.
        """
        assert self.runner is not None
        runner = self.runner
        discovered = asyncio.create_task(runner.discovered.wait())
        reported = (-1, -1)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {runner_task, discovered}, timeout=STARTUP_REPORT_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                # A first discovery of many worlds takes a while: say how far it is,
                # and extend systemd's start timeout only while registration moves.
                progress = runner.registration
                status = f"registering worlds: {progress[0]}/{progress[1]}"
                if progress != reported:
                    self.notifier.extend_timeout(STARTUP_EXTEND_SECONDS, status)
                    log.info("registering worlds", registered=progress[0], discovered=progress[1])
                else:
                    self.notifier.status(status)
                reported = progress
        finally:
            discovered.cancel()
        return not runner_task.done() and not self._stop_requested

    # ------------------------------------------------------------------ http
    def _load_token(self, s: Settings) -> str | None:
        if not s.http.enabled:
            return None
        try:
            token = load_admin_token(s.http)
            check_bind_allowed(s.http, token)
        except SettingsError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from None
        return token

    def _bind_http(self, s: Settings) -> socket.socket:
        try:
            return bind_socket(s.http.bind, s.http.port)
        except HttpBindError as exc:
            raise StartupError(str(exc), EXIT_ADDRESS_IN_USE if exc.in_use else EXIT_CONFIG) from None

    async def _start_http(self, sock: socket.socket, guard: ConnectionGuard, lag_monitor: LoopLagMonitor) -> HttpServer:
        assert self.runner is not None and self.metrics is not None and self.store is not None
        store = self.store
        backend = AdminBackend(
            runner=self.runner,
            metrics=self.metrics,
            token=lambda: self.admin_token,
            loop_lag=lag_monitor,
            accepting=lambda: self._stop_requested == 0,
            complete_generation=functools.partial(complete_for_api, store),
        )
        server = HttpServer(create_app(backend), sock, guard)
        await server.start()
        http = self.settings.http
        log.info(
            "http server listening",
            bind=http.bind,
            port=server.port,
            url=f"http://{http.bind if ':' not in http.bind else f'[{http.bind}]'}:{server.port}",
            admin_auth="token" if self.admin_token is not None else "none",
            max_connections=guard.max_connections,
            request_timeout_seconds=guard.request_timeout_seconds,
        )
        if self.admin_token is None:
            log.warning(
                "no admin token configured: the admin API is unauthenticated and served on loopback only",
                bind=http.bind,
            )
        return server

    def _reload_status(self) -> tuple[bool, float | None]:
        return self.last_reload_ok, self.last_reload_success_at

    # --------------------------------------------------------------- signals
    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requested += 1
        if self._stop_requested > 1:
            log.warning("second stop signal, exiting at once", signal=sig.name)
            os._exit(EXIT_FAILURE)
        log.info("stop requested, finishing in-flight ticks", signal=sig.name)
        self._notify_stopping()
        if self.runner is not None:
            self.runner.stop()

    def _notify_stopping(self) -> None:
        """STOPPING=1, once, as soon as shutdown begins (signal or loop end)."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping()

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_event.wait()
            # Let a burst of SIGHUPs arrive, then clear: they all share this
            # reload. A SIGHUP during the reload itself triggers one more, since
            # the file may have changed after it was read.
            await asyncio.sleep(RELOAD_SETTLE_SECONDS)
            self._reload_event.clear()
            try:
                await self.reload()
            except Exception as exc:
                # A bug here must not end reloading for the rest of the daemon's life.
                log.exception("configuration reload crashed")
                self._reload_failed(first_line(exc))

    async def reload(self) -> bool:
        """Re-read the config file; swap in the new settings only if all of it is valid.

        Returns whether the reload succeeded. On failure the running settings
        stay in force, the reason is logged at ERROR and kept in
        :attr:`last_reload_error`, and systemd's STATUS shows it.
        """
        self.reload_count += 1
        self.notifier.reloading()
        log.info("reloading configuration", path=str(self.config_path) if self.config_path else None)
        try:
            new = load_settings(self.config_path, required=self.config_required)
            if new.scheduler.behavior != self.settings.scheduler.behavior:
                load_decide_fn(new.scheduler.behavior)  # validate even though it needs a restart
            if new.generation.sink != self.settings.generation.sink:
                load_sink(new.generation.sink)
            # The token file is re-read on every reload; enabled is restart-only,
            # so the running value decides whether a token is read at all.
            running_http = self.settings.http
            token = load_admin_token(new.http) if running_http.enabled else None
            if running_http.enabled:
                _refuse_weaker_http(running_http, new.http, had_token=self.admin_token is not None, token=token)
                check_bind_allowed(new.http, token)
            warn_about_permissions(self.config_path, new.http if running_http.enabled else None)
            await self._validate_defaults(new)
        except (SettingsError, ValueError) as exc:
            return self._reload_failed(str(exc))
        except Exception as exc:  # the database, while checking the worlds against new defaults
            return self._reload_failed(f"defaults.simulation: cannot check the worlds' configs: {first_line(exc)}")
        await self._apply(new)
        if token != self.admin_token:
            log.info("admin token changed", admin_auth="token" if token is not None else "none")
        self.admin_token = token
        self.last_reload_ok = True
        self.last_reload_error = None
        self.last_reload_success_at = time.time()
        self.notifier.ready(status=self._status_line())
        return True

    def _reload_failed(self, reason: str) -> bool:
        self.last_reload_ok = False
        self.last_reload_error = reason
        log.error("configuration reload failed, keeping the running configuration", error=reason)
        self.notifier.ready(status=f"reload failed, running the previous configuration: {reason[:200]}")
        return False

    async def _validate_defaults(self, new: Settings) -> None:
        """Refuse new ``[defaults.simulation]`` that would make a running world's config invalid."""
        if new.defaults.simulation == self.settings.defaults.simulation or self.runner is None or self.store is None:
            return
        problems = []
        for record in await self.store.list_worlds(self.runner.world_ids):
            if record.problem is not None:
                continue  # unusable whatever the defaults: discovery isolates it
            try:
                parse_world_config(record.simulation_raw, world_id=record.id, defaults=new.defaults.simulation)
            except WorldConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise SettingsError("defaults.simulation: would make running worlds invalid: " + "; ".join(problems))

    async def _apply(self, new: Settings) -> None:
        old = self.settings
        needs_restart = restart_only_changes(old, new)
        if needs_restart:
            log.warning("changed settings need a restart to take effect; keeping their old values", keys=needs_restart)
            # Keep restart-only settings as they run now, so what we report is what runs.
            new = new.model_copy(
                update={
                    "database": old.database,
                    "http": new.http.model_copy(
                        update={
                            "enabled": old.http.enabled,
                            "bind": old.http.bind,
                            "port": old.http.port,
                            "max_connections": old.http.max_connections,
                            "request_timeout_seconds": old.http.request_timeout_seconds,
                        }
                    ),
                    "scheduler": new.scheduler.model_copy(
                        update={
                            "instance_id": old.scheduler.instance_id,
                            "lease_ttl_seconds": old.scheduler.lease_ttl_seconds,
                            "behavior": old.scheduler.behavior,
                        }
                    ),
                    "generation": new.generation.model_copy(update={"sink": old.generation.sink}),
                }
            )
        self.restart_pending = needs_restart
        configure_logging(new.logging.level, new.logging.format)
        self.settings = new
        if self.runner is not None and self.scheduler is not None:
            self.runner.set_limits(
                max_concurrent_ticks=new.scheduler.max_concurrent_ticks,
                max_batch_size=new.scheduler.max_batch_size,
                batch_window_seconds=new.scheduler.batch_window_seconds,
                tick_timeout_seconds=new.scheduler.tick_timeout_seconds,
                discovery_interval_seconds=new.scheduler.discovery_interval_seconds,
            )
            self.runner.backoff_max_seconds = new.scheduler.backoff_max_seconds
            _warn_if_pool_too_small(new)
            self.scheduler.sink_timeout_seconds = new.hand_off_timeout_seconds
            self.runner.tier_refresh_max_seconds = new.scheduler.tier_refresh_max_seconds
            if new.defaults.simulation != old.defaults.simulation:
                self.scheduler.defaults = dict(new.defaults.simulation)
                for world_id in self.runner.world_ids:
                    try:
                        await self.runner.apply_world_config(world_id)
                    except Exception as exc:
                        # Validated above; a database error leaves the world on its
                        # previous config until discovery sees its next change.
                        log.error("new defaults not applied to world", world_id=world_id, error=first_line(exc))
        if self.metrics is not None:
            self.metrics.per_world = new.metrics.per_world
        log.info("configuration reloaded", log_level=new.logging.level, restart_needed=needs_restart)

    def _status_line(self) -> str:
        """One line for ``systemctl status``; overwritten every STATUS_INTERVAL_SECONDS."""
        runner = self.runner
        worlds = len(runner.world_ids) if runner else 0
        text = f"{worlds} worlds"
        if runner is not None and runner.broken:
            text += f", {len(runner.broken)} isolated"
        if self.restart_pending:
            text += f"; restart needed for {', '.join(self.restart_pending)}"
        return text

    async def _status_loop(self) -> None:
        last_ticks, last_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(STATUS_INTERVAL_SECONDS)
            if self.runner is None:
                continue
            now = time.monotonic()
            ticks = self.runner.ticks_ok
            rate = (ticks - last_ticks) / max(now - last_at, 1e-9)
            last_ticks, last_at = ticks, now
            status = f"{self._status_line()}, {rate:.1f} ticks/s, {self.runner.ticks_failed} failed ticks"
            if not self.last_reload_ok:
                status += "; last reload failed"
            self.notifier.status(status)

    async def _activity_loop(self) -> None:
        """One INFO line per world every ``logging.activity_summary_seconds``.

        Shows the NPCs changing activities through the game day without a
        line per tick; the period is read each round, so SIGHUP changes it.
        """
        last_total: dict[int, int] = {}
        while True:
            period = self.settings.logging.activity_summary_seconds
            await asyncio.sleep(period if period > 0 else 5.0)
            if period <= 0 or self.scheduler is None:
                continue
            totals: dict[int, int] = {}
            for world_id, ctx in sorted(self.scheduler.get_all_contexts().items()):
                snapshot = ctx.activity_snapshot()
                totals[world_id] = snapshot.pop("decisions_total")
                # Decisions since the previous line (since registration for a new world).
                since = totals[world_id] - last_total.get(world_id, 0)
                log.info("world activity", world_id=world_id, decisions=since, **snapshot)
            last_total = totals

    def get_stats(self) -> dict[str, Any]:
        """Daemon-level stats: reload state plus the runner's."""
        stats: dict[str, Any] = self.runner.get_stats() if self.runner else {}
        stats["config_reload"] = {
            "count": self.reload_count,
            "last_successful": self.last_reload_ok,
            "last_error": self.last_reload_error,
            "last_success_timestamp": self.last_reload_success_at,
            "restart_pending": list(self.restart_pending),
        }
        return stats


def _version() -> str:
    from scheduler_daemon import __version__

    return __version__


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _refuse_weaker_http(running: HttpSettings, new: HttpSettings, *, had_token: bool, token: str | None) -> None:
    """Refuse a reload that would switch authentication off or move the listener.

    A file caught half-written (valid TOML without ``[http]``) must not open
    the admin API: a daemon started with a token keeps requiring one, and the
    bind address only changes with a restart.
    """
    if had_token and token is None:
        raise SettingsError(
            "http.admin_token_file: the running daemon requires an admin token and the new configuration "
            "configures none (a half-written file?); set it again, or restart to run without one"
        )
    if new.bind != running.bind:
        raise SettingsError(
            f"http.bind: {new.bind!r} differs from the running {running.bind!r}; the bind address changes "
            "only with a restart"
        )


def warn_about_permissions(config_path: Path | None, http: HttpSettings | None) -> None:
    """WARNING for a config file others can write and an admin token file others can read (never fatal)."""
    if config_path is not None:
        mode = _mode(config_path)
        if mode is not None and mode & 0o022:
            log.warning(
                "config file is writable by others",
                path=str(config_path),
                mode=oct(mode),
                hint="chmod go-w: whoever can write it can change the daemon's settings on the next reload",
            )
    path = token_path(http) if http is not None else None
    if path is not None:
        mode = _mode(path)
        if mode is not None and mode & 0o004:
            log.warning(
                "admin token file is readable by others",
                path=str(path),
                mode=oct(mode),
                hint="chmod o-r, or load it as the systemd credential admin-token",
            )


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return None  # missing or unreadable: reading it reports that


def _warn_if_pool_too_small(s: Settings) -> None:
    """Tick batches beyond the pool wait for a connection, and overflow connections churn."""
    pool = s.database.pool_size + s.database.max_overflow
    # SQLite's engine has no such pool (and one writer at a time anyway).
    if s.database.url.startswith("postgresql") and s.scheduler.max_concurrent_ticks > s.database.pool_size:
        log.warning(
            "scheduler.max_concurrent_ticks exceeds database.pool_size: batches beyond the pool open and "
            "close a connection each time, and beyond pool_size + max_overflow they wait for one",
            max_concurrent_ticks=s.scheduler.max_concurrent_ticks,
            pool_size=s.database.pool_size,
            max_overflow=s.database.max_overflow,
            pool_total=pool,
        )


def _raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (logged); returns the soft limit in force."""
    before, soft, hard = raise_open_files_limit()
    log.info("open files limit", soft=soft, hard=hard, soft_at_start=before)
    return soft


def _connection_guard(s: Settings, open_files: int) -> ConnectionGuard:
    """The HTTP connection guard, its limit lowered if connections plus everything else exceed ``open_files``."""
    db_pools = s.database.pool_size + s.database.max_overflow + LEASE_POOL_SIZE + LEASE_POOL_OVERFLOW
    reserved = db_pools + ACCEPT_PIPELINE_FDS + OTHER_OPEN_FILES
    limit = fit_connection_limit(s.http.max_connections, soft_limit=open_files, reserved=reserved)
    if limit < s.http.max_connections:
        log.warning(
            "http.max_connections lowered to fit the open-files limit (raise LimitNOFILE= or ulimit -n)",
            max_connections=s.http.max_connections,
            effective_max_connections=limit,
            open_files_limit=open_files,
            reserved_database_pools=db_pools,
            reserved_accepting=ACCEPT_PIPELINE_FDS,
            reserved_other=OTHER_OPEN_FILES,
        )
    return ConnectionGuard(max_connections=limit, request_timeout_seconds=s.http.request_timeout_seconds)
