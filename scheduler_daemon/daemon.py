"""Daemon lifecycle: connect, check schema, run the loop, handle signals, stop cleanly.

Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP reloads the
settings file (bursts coalesce into one reload). systemd is told about every
state change over ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from scheduler_daemon.clock import MonotonicClock
from scheduler_daemon.leasing import LeaseKeeper
from scheduler_daemon.logs import configure_logging
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.settings import Settings, SettingsError, load_settings, restart_only_changes
from scheduler_daemon.simulation.behavior import load_decide_fn
from scheduler_daemon.store.database import create_engine
from scheduler_daemon.store.errors import is_transient
from scheduler_daemon.store.leases import LeaseStore
from scheduler_daemon.store.migrate import SchemaNotMigratedError
from scheduler_daemon.store.repository import Store
from scheduler_daemon.systemd import SystemdNotifier, watchdog_interval_seconds, watchdog_loop

log = structlog.get_logger("scheduler_daemon.daemon")

T = TypeVar("T")

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_NOT_MIGRATED = 4
EXIT_ADDRESS_IN_USE = 5
EXIT_ALREADY_RUNNING = 6


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


async def retry_transient(
    what: str, func: Callable[[], Awaitable[T]], *, max_seconds: float, max_wait: float = 5.0
) -> T:
    """Run a whole unit of work, retrying transient database errors with jittered backoff."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            f"{what} failed, retrying",
            attempt=state.attempt_number,
            error=f"{type(exc).__name__}: {exc}".splitlines()[0] if exc else None,
            retry_in_seconds=round(state.upcoming_sleep, 2),
        )

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.2, max=max_wait),
        stop=stop_after_delay(max_seconds),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return await func()
    raise AssertionError("unreachable")  # pragma: no cover


class Daemon:
    """The running daemon: settings, store, scheduler, runner, signals, systemd."""

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
        self.last_reload_ok: bool | None = None
        self.last_reload_error: str | None = None
        self.last_reload_success_at: float | None = None  # wall time, for humans/metrics
        self._stop_requested = 0
        self._reload_event = asyncio.Event()
        self._stopped = asyncio.Event()

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
        try:
            await retry_transient("database connection", store.ping, max_seconds=db.connect_retry_seconds)
        except Exception as exc:
            await store.dispose()
            raise StartupError(
                f"database unreachable after {db.connect_retry_seconds:g}s of retries: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                EXIT_DATABASE,
            ) from None
        try:
            await store.check_schema()
        except SchemaNotMigratedError as exc:
            await store.dispose()
            raise StartupError(str(exc), EXIT_NOT_MIGRATED) from None
        return store

    async def run(self) -> int:
        """Run until stopped by a signal; returns the process exit code."""
        s = self.settings
        log.info("starting", version=_version(), database=_redact(s.database.url), instance_id=s.scheduler.instance_id)
        if self.config_path is not None and not self.config_path.exists() and not self.config_required:
            log.warning("no config file, using defaults and environment", path=str(self.config_path))
        try:
            decide_fn = load_decide_fn(s.scheduler.behavior)
        except ValueError as exc:
            raise StartupError(f"scheduler.behavior: {exc}", EXIT_CONFIG) from None
        self._sqlite_lock_fd = lock_sqlite_database(s.database.url)
        self.store = await self._connect()
        self.scheduler = WorldScheduler(self.store, defaults=s.defaults.simulation, decide_fn=decide_fn)
        clock = MonotonicClock()
        if self.store.dialect == "postgresql":
            # Always lease on PostgreSQL, so starting another daemon is all it takes to scale out.
            # Heartbeats and renewals get their own small pool: they must never
            # queue behind ticks for a connection, or a busy daemon loses its leases.
            self._lease_engine = create_engine(
                s.database.url, pool_size=2, max_overflow=2, connect_timeout=s.database.connect_timeout_seconds
            )
            self.leases = LeaseKeeper(
                LeaseStore(self._lease_engine, s.scheduler.instance_id, s.scheduler.lease_ttl_seconds), clock
            )
        self.runner = SchedulerLoopRunner(
            self.scheduler,
            clock=clock,
            leases=self.leases,
            max_concurrent_ticks=s.scheduler.max_concurrent_ticks,
            tick_timeout_seconds=s.scheduler.tick_timeout_seconds,
            discovery_interval_seconds=s.scheduler.discovery_interval_seconds,
            backoff_max_seconds=s.scheduler.backoff_max_seconds,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_event.set)
        background: list[asyncio.Task[Any]] = [asyncio.create_task(self._reload_loop(), name="reload")]
        wd = watchdog_interval_seconds()
        if wd is not None and self.notifier.enabled:
            background.append(
                asyncio.create_task(
                    watchdog_loop(self.notifier, wd, lambda: self.runner.progress if self.runner else 0)
                )
            )
        background.append(asyncio.create_task(self._status_loop(), name="status"))
        runner_task = asyncio.create_task(self.runner.start(), name="runner")
        self.notifier.ready(status="started")
        log.info("ready")
        try:
            await runner_task
        finally:
            self.notifier.stopping()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.runner.shutdown()
            await self.store.dispose()
            if self._lease_engine is not None:
                await self._lease_engine.dispose()
            if self._sqlite_lock_fd is not None:
                os.close(self._sqlite_lock_fd)
                self._sqlite_lock_fd = None
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_OK

    # --------------------------------------------------------------- signals
    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_requested += 1
        if self._stop_requested > 1:
            log.warning("second stop signal, exiting at once", signal=sig.name)
            os._exit(EXIT_FAILURE)
        log.info("stop requested, finishing in-flight ticks", signal=sig.name)
        self.notifier.stopping()
        if self.runner is not None:
            self.runner.stop()

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_event.wait()
            # Clear before reloading: a SIGHUP during the reload triggers one more.
            self._reload_event.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file; swap in the new settings only if all of it is valid."""
        self.reload_count += 1
        self.notifier.reloading()
        log.info("reloading configuration", path=str(self.config_path) if self.config_path else None)
        try:
            new = load_settings(self.config_path, required=self.config_required)
            if new.scheduler.behavior != self.settings.scheduler.behavior:
                load_decide_fn(new.scheduler.behavior)  # validate even though it needs a restart
        except (SettingsError, ValueError) as exc:
            self.last_reload_ok = False
            self.last_reload_error = str(exc)
            log.error("configuration reload failed, keeping the running configuration", error=str(exc))
            self.notifier.ready(status=f"reload failed: {str(exc)[:200]}")
            return False
        await self._apply(new)
        self.last_reload_ok = True
        self.last_reload_error = None
        self.last_reload_success_at = time.time()
        self.notifier.ready(status="configuration reloaded")
        return True

    async def _apply(self, new: Settings) -> None:
        old = self.settings
        needs_restart = restart_only_changes(old, new)
        if needs_restart:
            log.warning("changed settings need a restart to take effect; keeping their old values", keys=needs_restart)
            # Keep restart-only sections as they run now, so what we report is what runs.
            new = new.model_copy(
                update={
                    "database": old.database,
                    "http": new.http.model_copy(
                        update={"enabled": old.http.enabled, "bind": old.http.bind, "port": old.http.port}
                    ),
                    "scheduler": new.scheduler.model_copy(
                        update={
                            "instance_id": old.scheduler.instance_id,
                            "lease_ttl_seconds": old.scheduler.lease_ttl_seconds,
                            "behavior": old.scheduler.behavior,
                        }
                    ),
                }
            )
        configure_logging(new.logging.level, new.logging.format)
        self.settings = new
        if self.runner is not None and self.scheduler is not None:
            self.runner.set_limits(
                max_concurrent_ticks=new.scheduler.max_concurrent_ticks,
                tick_timeout_seconds=new.scheduler.tick_timeout_seconds,
                discovery_interval_seconds=new.scheduler.discovery_interval_seconds,
            )
            self.runner.backoff_max_seconds = new.scheduler.backoff_max_seconds
            if new.defaults.simulation != old.defaults.simulation:
                self.scheduler.defaults = dict(new.defaults.simulation)
                for world_id in self.runner.world_ids:
                    try:
                        await self.runner.apply_world_config(world_id)
                    except Exception as exc:
                        log.error("new defaults invalid for world", world_id=world_id, error=str(exc))
        log.info("configuration reloaded", log_level=new.logging.level, restart_needed=needs_restart)

    async def _status_loop(self) -> None:
        last_ticks, last_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(5.0)
            if self.runner is None:
                continue
            now = time.monotonic()
            ticks = self.runner.ticks_ok
            rate = (ticks - last_ticks) / max(now - last_at, 1e-9)
            last_ticks, last_at = ticks, now
            self.notifier.status(
                f"{len(self.runner.world_ids)} worlds, {rate:.1f} ticks/s, "
                f"{len(self.runner.broken)} isolated, {self.runner.ticks_failed} failed ticks"
            )

    def get_stats(self) -> dict[str, Any]:
        """Daemon-level stats: reload state plus the runner's."""
        stats: dict[str, Any] = self.runner.get_stats() if self.runner else {}
        stats["config_reload"] = {
            "count": self.reload_count,
            "last_successful": self.last_reload_ok,
            "last_error": self.last_reload_error,
            "last_success_timestamp": self.last_reload_success_at,
        }
        return stats


def _version() -> str:
    from scheduler_daemon import __version__

    return __version__


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
