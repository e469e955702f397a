"""Daemon lifecycle: connect, check schema, run the loop, handle signals, stop cleanly.

Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP reloads the
settings file (bursts coalesce into one reload). systemd is told about every
state change over ``$NOTIFY_SOCKET``. As a worker of ``run --workers``
(:class:`WorkerRole`) the same daemon serves its admin API on a private Unix
socket, reports to the supervisor over ``$NOTIFY_SOCKET``, and stops when the
supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler_daemon import collector
from scheduler_daemon.change_listener import ChangeListener
from scheduler_daemon.clock import MonotonicClock
from scheduler_daemon.exits import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_NOT_MIGRATED,
    EXIT_OK,
    StartupError,
)
from scheduler_daemon.http.connections import raise_open_files_limit
from scheduler_daemon.http.listener import AdminListener, connection_guard, load_startup_token
from scheduler_daemon.http.routes import create_app
from scheduler_daemon.instance_lock import lock_sqlite_database
from scheduler_daemon.logs import configure_logging, get_logger
from scheduler_daemon.loop_lag import LoopLagMonitor
from scheduler_daemon.plugins import Plugins
from scheduler_daemon.reload import ReloadState, check_new_settings, keep_restart_only, warn_about_permissions
from scheduler_daemon.retry import first_line, retry_transient
from scheduler_daemon.runtime import Runtime, Telemetry, build_runtime, database_connections
from scheduler_daemon.settings import Settings, SettingsError, load_settings
from scheduler_daemon.store.errors import SchemaNotMigratedError
from scheduler_daemon.store.repository import Store
from scheduler_daemon.store.target import hide_password
from scheduler_daemon.systemd import SystemdNotifier, watchdog_interval_seconds, watchdog_loop
from scheduler_daemon.world_config import WorldConfigError, parse_world_config

log = get_logger("scheduler_daemon.daemon")

#: SIGHUPs arriving this soon after the first join its reload (``for f in …; kill -HUP``).
RELOAD_SETTLE_SECONDS = 0.2
#: While the first discovery registers worlds: report progress this often, and
#: ask systemd for this much more start-up time whenever registration moved.
STARTUP_REPORT_SECONDS = 2.0
STARTUP_EXTEND_SECONDS = 30.0
#: How often ``STATUS=`` is refreshed for ``systemctl status``.
STATUS_INTERVAL_SECONDS = 5.0
#: How often a worker checks that its supervisor still runs.
ORPHAN_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerRole:
    """This daemon is worker ``index`` of a supervisor (``run --workers``), serving on ``admin_socket``.

    ``supervisor_pid`` comes from the supervisor itself: a parent pid read at
    start-up would already be init's if the supervisor died before it.
    """

    index: int
    admin_socket: Path
    supervisor_pid: int


class Daemon:
    """The running daemon: settings, runtime, admin port, signals, systemd, reloads."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        *,
        config_required: bool = True,
        worker: WorkerRole | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.config_required = config_required
        self.worker = worker
        self.notifier = SystemdNotifier()
        self.runtime: Runtime | None = None
        self.reloads = ReloadState()
        self.admin_token: str | None = None
        self.started_monotonic = time.monotonic()
        self._stop_requested = 0
        self._stopping_sent = False
        self._reload_event = asyncio.Event()
        #: Set by the first stop signal (what startup waits on besides its own work).
        self._stop_signalled = asyncio.Event()

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
            await retry_transient("database_connection", connect_and_check, max_seconds=db.connect_retry_seconds)
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
        log.info(
            "starting", version=_version(), database=hide_password(s.database.url), instance_id=s.scheduler.instance_id
        )
        if self.config_path is not None and not self.config_path.exists() and not self.config_required:
            log.warning("config_file_missing", path=str(self.config_path))
        loop = asyncio.get_running_loop()
        # From here a SIGHUP is never fatal: it waits for the reload loop.
        loop.add_signal_handler(signal.SIGHUP, self._reload_event.set)
        try:
            async with self._resources() as (runtime, listener):
                return await self._serve(runtime, listener)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[tuple[Runtime, AdminListener | None]]:
        """Open everything the daemon holds, in the order that fails fastest; release it all on exit.

        The admin port is validated and bound before the database connect (a
        bad token file or a port in use fails at once with one line).
        """
        s = self.settings
        warn_about_permissions(self.config_path, s.http if s.http.enabled else None)
        try:
            plugins = Plugins.from_settings(s)
        except SettingsError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from None
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(plugins.aclose)  # last: after the runner's final hand-offs
            listener = None
            open_files = _raise_open_files_limit()
            if s.http.enabled:
                self.admin_token = load_startup_token(s.http)
                guard = connection_guard(s.http, open_files=open_files, database_pools=database_connections(s))
                listener = AdminListener(s.http, guard, unix_path=self.worker.admin_socket if self.worker else None)
                stack.push_async_callback(listener.close)
            lock_fd = lock_sqlite_database(s.database.url)
            if lock_fd is not None:
                stack.callback(os.close, lock_fd)
            store = await self._connect()
            stack.push_async_callback(store.dispose)
            telemetry = Telemetry(
                _version(), reload_status=self.reloads.status, http_connections=listener.guard if listener else None
            )
            runtime = build_runtime(
                s,
                store,
                MonotonicClock(),
                plugins=plugins,
                telemetry=telemetry,
                # Always lease on PostgreSQL, so starting another daemon is all it takes to scale out.
                leases=store.dialect == "postgresql",
                notifications=store.dialect == "postgresql",
            )
            stack.push_async_callback(runtime.close)
            self.runtime = runtime
            _warn_if_pool_too_small(s)
            yield runtime, listener

    async def _serve(self, runtime: Runtime, listener: AdminListener | None) -> int:
        loop = asyncio.get_running_loop()
        runner = runtime.runner
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        background = self._start_background(runtime)
        lag_monitor = LoopLagMonitor()
        lag_monitor.start()
        runner_task: asyncio.Task[None] | None = None
        try:
            if listener is not None:
                # Serving before READY=1: the port is bound and answering when systemd counts us up.
                admin = runtime.admin(lag_monitor, accepting=lambda: self._stop_requested == 0)
                app = create_app(admin, token=lambda: self.admin_token)
                await listener.serve(app, authenticated=self.admin_token is not None)
            if runtime.changes is not None:
                await self._wait_for_listen(runtime.changes)
            # A stop signal before this point found no loop to stop (and start() would clear it).
            if not self._stop_requested:
                runner_task = asyncio.create_task(runner.start(), name="runner")
                if await self._serving(runner_task):
                    collector.settle()
                    self.notifier.ready(status=self._status_line())
                    log.info("ready", worlds=len(runner.world_ids))
                await runner_task
        finally:
            self._notify_stopping()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if runner_task is not None and not runner_task.done():  # startup failed after the runner started
                runner.stop()
                await asyncio.gather(runner_task, return_exceptions=True)
            await runner.shutdown()
            if listener is not None:
                await listener.close()
            await lag_monitor.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_OK

    async def _wait_for_listen(self, changes: ChangeListener) -> None:
        """LISTEN before the first discovery reads the worlds, so no change falls in between.

        Waits at most ``database.connect_timeout_seconds``, and not past a stop
        signal; if LISTEN still fails, the listener keeps retrying and
        discovers once it listens.
        """
        waits = [asyncio.ensure_future(changes.listening.wait()), asyncio.ensure_future(self._stop_signalled.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.settings.database.connect_timeout_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiting in waits:
                waiting.cancel()

    def _start_background(self, runtime: Runtime) -> list[asyncio.Task[Any]]:
        background = [
            asyncio.create_task(self._reload_loop(), name="reload"),
            asyncio.create_task(self._status_loop(), name="status"),
            asyncio.create_task(self._activity_loop(), name="activity-summary"),
        ]
        if runtime.changes is not None:
            background.append(asyncio.create_task(runtime.changes.run(), name="change-notifications"))
        if self.worker is not None:
            watch = self._orphan_watch(self.worker.supervisor_pid)
            background.append(asyncio.create_task(watch, name="supervisor-watch"))
        wd = watchdog_interval_seconds()
        if wd is not None and self.notifier.enabled:
            runner = runtime.runner
            # The loop must show progress within every watchdog interval even when idle.
            runner.idle_wake_seconds = min(runner.idle_wake_seconds, wd / 2)
            background.append(asyncio.create_task(watchdog_loop(self.notifier, wd, lambda: runner.progress)))
        return background

    async def _serving(self, runner_task: asyncio.Task[None]) -> bool:
        """Wait until the first discovery registered every world; False if the daemon stopped meanwhile.

        READY=1 follows this. While registration takes long, systemd is told
        how far it is and asked for more start-up time as long as it moves.
        """
        assert self.runtime is not None
        runner = self.runtime.runner
        discovered = asyncio.create_task(runner.discovered.wait())
        reported = (-1, -1)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {runner_task, discovered}, timeout=STARTUP_REPORT_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                progress = runner.registration
                status = f"registering worlds: {progress[0]}/{progress[1]}"
                if progress != reported:
                    self.notifier.extend_timeout(STARTUP_EXTEND_SECONDS, status)
                    log.info("worlds_registering", registered=progress[0], discovered=progress[1])
                else:
                    self.notifier.status(status)
                reported = progress
        finally:
            discovered.cancel()
        return not runner_task.done() and not self._stop_requested

    # --------------------------------------------------------------- signals
    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requested += 1
        if self._stop_requested > 1:
            log.warning("second_stop_signal", signal=sig.name)
            os._exit(EXIT_FAILURE)
        log.info("stop_requested", signal=sig.name)
        self._stop_signalled.set()
        self._notify_stopping()
        if self.runtime is not None:
            self.runtime.runner.stop()

    async def _orphan_watch(self, supervisor_pid: int) -> None:
        """A worker whose supervisor died (SIGKILL) stops as if told to: nobody else would stop it."""
        while True:
            await asyncio.sleep(ORPHAN_CHECK_SECONDS)
            if os.getppid() != supervisor_pid:
                break
        if not self._stop_requested:
            log.error("supervisor_gone", supervisor_pid=supervisor_pid)
            self._on_stop_signal(signal.SIGTERM)

    def _notify_stopping(self) -> None:
        """STOPPING=1, once, as soon as shutdown begins (signal or loop end)."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping()

    # ---------------------------------------------------------------- reload
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
                log.exception("config_reload_crashed")
                self._reload_failed(first_line(exc))

    async def reload(self) -> bool:
        """Re-read the config file; swap in the new settings only if all of it is valid.

        Returns whether the reload succeeded. On failure the running settings
        stay in force, the reason is logged at ERROR and kept in
        :attr:`reloads`, and systemd's STATUS shows it.
        """
        self.reloads.count += 1
        self.notifier.reloading()
        log.info("config_reloading", path=str(self.config_path) if self.config_path else None)
        try:
            new = load_settings(self.config_path, required=self.config_required)
            token = check_new_settings(new, self.settings, running_token=self.admin_token, config_path=self.config_path)
            await self._validate_defaults(new)
        except (SettingsError, ValueError) as exc:
            return self._reload_failed(str(exc))
        except Exception as exc:  # the database, while checking the worlds against new defaults
            return self._reload_failed(f"defaults.simulation: cannot check the worlds' configs: {first_line(exc)}")
        await self._apply(new)
        if token != self.admin_token:
            log.info("admin_token_changed", admin_auth="token" if token is not None else "none")
        self.admin_token = token
        self.reloads.succeeded()
        self.notifier.ready(status=self._status_line())
        return True

    def _reload_failed(self, reason: str) -> bool:
        self.reloads.failed(reason)
        log.error("config_reload_failed", error=reason)
        self.notifier.ready(status=f"reload failed, running the previous configuration: {reason[:200]}")
        return False

    async def _validate_defaults(self, new: Settings) -> None:
        """Refuse new ``[defaults.simulation]`` that would make a running world's config invalid."""
        runtime = self.runtime
        if new.defaults.simulation == self.settings.defaults.simulation or runtime is None:
            return
        problems = []
        for record in await runtime.store.list_worlds(runtime.runner.world_ids):
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
        new, self.reloads.restart_pending = keep_restart_only(old, new)
        configure_logging(new.logging.level, new.logging.format)
        self.settings = new
        runtime = self.runtime
        if runtime is not None:
            runtime.reconfigure(new)
            _warn_if_pool_too_small(new)
            if new.defaults.simulation != old.defaults.simulation:
                runtime.scheduler.defaults = dict(new.defaults.simulation)
                for world_id in runtime.runner.world_ids:
                    try:
                        await runtime.runner.apply_world_config(world_id)
                    except Exception as exc:
                        # Validated above; a database error leaves the world on its
                        # previous config until discovery sees its next change.
                        log.error("world_defaults_not_applied", world_id=world_id, error=first_line(exc))
        log.info("config_reloaded", log_level=new.logging.level, restart_needed=self.reloads.restart_pending)

    # ---------------------------------------------------------------- status
    def _status_line(self) -> str:
        """One line for ``systemctl status``; overwritten every STATUS_INTERVAL_SECONDS."""
        runner = self.runtime.runner if self.runtime else None
        text = f"{len(runner.world_ids) if runner else 0} worlds"
        if runner is not None and runner.broken:
            text += f", {len(runner.broken)} isolated"
        if self.reloads.restart_pending:
            text += f"; restart needed for {', '.join(self.reloads.restart_pending)}"
        return text

    async def _status_loop(self) -> None:
        last_ticks, last_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(STATUS_INTERVAL_SECONDS)
            if self.runtime is None:
                continue
            runner = self.runtime.runner
            now = time.monotonic()
            rate = (runner.ticks_ok - last_ticks) / max(now - last_at, 1e-9)
            last_ticks, last_at = runner.ticks_ok, now
            status = f"{self._status_line()}, {rate:.1f} ticks/s, {runner.ticks_failed} failed ticks"
            if not self.reloads.ok:
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
            if period <= 0 or self.runtime is None:
                continue
            totals: dict[int, int] = {}
            for world_id, ctx in sorted(self.runtime.scheduler.get_all_contexts().items()):
                snapshot = ctx.activity_snapshot()
                totals[world_id] = snapshot.pop("decisions_total")
                # Decisions since the previous line (since registration for a new world).
                since = totals[world_id] - last_total.get(world_id, 0)
                log.info("world_activity", world_id=world_id, decisions=since, **snapshot)
            last_total = totals

    def get_stats(self) -> dict[str, Any]:
        """Daemon-level stats: reload state plus the runner's."""
        stats: dict[str, Any] = self.runtime.runner.get_stats() if self.runtime else {}
        stats["config_reload"] = self.reloads.as_stats()
        return stats


def _version() -> str:
    from scheduler_daemon import __version__

    return __version__


def _warn_if_pool_too_small(s: Settings) -> None:
    """Tick batches beyond the pool wait for a connection, and overflow connections churn."""
    # SQLite's engine has no such pool (and one writer at a time anyway).
    if s.database.url.startswith("postgresql") and s.scheduler.max_concurrent_ticks > s.database.pool_size:
        log.warning(
            "pool_smaller_than_concurrency",
            hint="batches beyond the pool open and close a connection each time; beyond the total they wait",
            max_concurrent_ticks=s.scheduler.max_concurrent_ticks,
            pool_size=s.database.pool_size,
            max_overflow=s.database.max_overflow,
            pool_total=s.database.pool_size + s.database.max_overflow,
        )


def _raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (logged); returns the soft limit in force."""
    before, soft, hard = raise_open_files_limit()
    log.info("open_files_limit", soft=soft, hard=hard, soft_at_start=before)
    return soft
