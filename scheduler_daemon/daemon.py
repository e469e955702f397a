"""Daemon lifecycle: connect, check schema, run the loop, handle signals, stop cleanly.

Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP reloads the
settings file (bursts coalesce into one reload). systemd is told about every
state change over ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from scheduler_daemon.http import (
    AdminBackend,
    HttpBindError,
    HttpServer,
    LoopLagMonitor,
    bind_socket,
    check_bind_allowed,
    create_app,
    load_admin_token,
)
from scheduler_daemon.logs import configure_logging
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.settings import Settings, SettingsError, load_settings, restart_only_changes
from scheduler_daemon.simulation.behavior import load_decide_fn
from scheduler_daemon.store.errors import is_transient
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


class StartupError(RuntimeError):
    """A startup failure with a one-line reason and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
        self.started_monotonic = time.monotonic()
        self.reload_count = 0
        self.last_reload_ok: bool | None = None
        self.last_reload_error: str | None = None
        # Wall time of the last successful (re)load, for humans/metrics; the
        # initial load counts, so a daemon never reloaded is not "stale".
        self.last_reload_success_at: float | None = time.time()
        self.metrics: SchedulerMetrics | None = None
        self.admin_token: str | None = None
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
        # HTTP: validate the token and bind the port before anything slow, so a
        # bad token file or a port in use fails at once with one line.
        self.admin_token = self._load_token(s)
        sock = self._bind_http(s) if s.http.enabled else None
        try:
            self.store = await self._connect()
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.scheduler = WorldScheduler(self.store, defaults=s.defaults.simulation, decide_fn=decide_fn)
        self.metrics = SchedulerMetrics(
            version=_version(), per_world=s.metrics.per_world, reload_status=self._reload_status
        )
        self.runner = SchedulerLoopRunner(
            self.scheduler,
            max_concurrent_ticks=s.scheduler.max_concurrent_ticks,
            tick_timeout_seconds=s.scheduler.tick_timeout_seconds,
            discovery_interval_seconds=s.scheduler.discovery_interval_seconds,
            backoff_max_seconds=s.scheduler.backoff_max_seconds,
            observer=self.metrics,
        )
        self.metrics.runner = self.runner
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
        lag_monitor = LoopLagMonitor()
        lag_monitor.start()
        http_server = None
        if sock is not None:
            http_server = await self._start_http(sock, lag_monitor)
        runner_task = asyncio.create_task(self.runner.start(), name="runner")
        # READY=1 only now: the database answers and the HTTP port is bound and serving.
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
            if http_server is not None:
                await http_server.stop()
            await lag_monitor.stop()
            await self.store.dispose()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_OK

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

    async def _start_http(self, sock: socket.socket, lag_monitor: LoopLagMonitor) -> HttpServer:
        assert self.runner is not None and self.metrics is not None
        backend = AdminBackend(
            runner=self.runner,
            metrics=self.metrics,
            token=lambda: self.admin_token,
            loop_lag=lag_monitor,
            accepting=lambda: self._stop_requested == 0,
        )
        server = HttpServer(create_app(backend), sock)
        await server.start()
        http = self.settings.http
        log.info(
            "http server listening",
            bind=http.bind,
            port=server.port,
            url=f"http://{http.bind if ':' not in http.bind else f'[{http.bind}]'}:{server.port}",
            admin_auth="token" if self.admin_token is not None else "none",
        )
        if self.admin_token is None:
            log.warning(
                "no admin token configured: the admin API is unauthenticated and served on loopback only",
                bind=http.bind,
            )
        return server

    def _reload_status(self) -> tuple[bool, float | None]:
        return self.last_reload_ok is not False, self.last_reload_success_at

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
            # The token file is re-read on every reload; bind/enabled are restart-only,
            # so the running ones decide whether a token is required.
            running_http = self.settings.http
            new_http = new.http.model_copy(update={"enabled": running_http.enabled, "bind": running_http.bind})
            token = load_admin_token(new_http) if running_http.enabled else None
            if running_http.enabled:
                check_bind_allowed(new_http, token)
        except (SettingsError, ValueError) as exc:
            self.last_reload_ok = False
            self.last_reload_error = str(exc)
            log.error("configuration reload failed, keeping the running configuration", error=str(exc))
            self.notifier.ready(status=f"reload failed: {str(exc)[:200]}")
            return False
        await self._apply(new)
        if token != self.admin_token:
            log.info("admin token changed", admin_auth="token" if token is not None else "none")
        self.admin_token = token
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
        if self.metrics is not None:
            self.metrics.per_world = new.metrics.per_world
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
