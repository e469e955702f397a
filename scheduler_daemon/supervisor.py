"""``run --workers N``: N daemon processes on one machine, sharing the worlds through PostgreSQL leases.

The supervisor validates the config once, then starts N workers: the same
``scheduler-daemon run`` with the same config file and environment, each with
the lease-owner id ``<instance_id>-w<i>``. A worker does not bind the public
port: it serves its admin API and ``/metrics`` on a Unix socket in a private
runtime directory (mode 0700: reachable by the service user only, no port to
pick, announce or collide, nothing a network peer can reach around the
supervisor), and reports to the supervisor with ``sd_notify`` over a datagram
socket of its own there (READY, STATUS, WATCHDOG, STOPPING), exactly as it
would report to systemd. The supervisor binds ``[http] bind``/``port`` and
forwards to the workers (:mod:`scheduler_daemon.http.proxy`).

Signals: SIGHUP re-validates the config and, if valid, is forwarded to every
worker; SIGTERM/SIGINT are forwarded and the workers are waited for (bounded).
A worker that dies after start-up is restarted with exponential backoff
(its worlds move to the others when their leases expire, and come back as
the fair share rebalances); one that fails before every worker was ready
ends the supervisor with its exit code, as a single daemon's start-up would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from scheduler_daemon.daemon import WorkerRole
from scheduler_daemon.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, StartupError
from scheduler_daemon.http.connections import ConnectionGuard, raise_open_files_limit
from scheduler_daemon.http.listener import AdminListener, connection_guard, load_startup_token
from scheduler_daemon.http.proxy import WorkerEndpoint, WorkerProxy
from scheduler_daemon.logs import configure_logging, get_logger
from scheduler_daemon.metrics import http_connection_families
from scheduler_daemon.metrics_exposition import WithoutCreated
from scheduler_daemon.reload import check_new_settings, keep_restart_only
from scheduler_daemon.settings import Settings, SettingsError, load_settings
from scheduler_daemon.store.leases import current_owner
from scheduler_daemon.store.repository import Store
from scheduler_daemon.systemd import (
    NOTIFY_SOCKET_ENV,
    WATCHDOG_PID_ENV,
    WATCHDOG_USEC_ENV,
    SystemdNotifier,
    watchdog_interval_seconds,
    watchdog_loop,
)

log = get_logger("scheduler_daemon.supervisor")

#: The most workers one supervisor runs (also the bound of ``scheduler.workers``).
MAX_WORKERS = 64
#: A worker that died is restarted after this, doubled for each quick death in a row, up to the maximum.
RESTART_BACKOFF_SECONDS = 0.5
RESTART_BACKOFF_MAX_SECONDS = 30.0
#: A worker that ran this long before dying is restarted after the base backoff again.
STABLE_RUN_SECONDS = 60.0
#: Stop: the workers' own bound (in-flight ticks, each within the tick timeout) plus this, then SIGKILL.
STOP_GRACE_SECONDS = 15.0
#: A reload is reported done when every worker reported it done, or after this.
RELOAD_WAIT_SECONDS = 60.0
RELOAD_SETTLE_SECONDS = 0.2
STATUS_INTERVAL_SECONDS = 5.0


def check_workers(settings: Settings, workers: int, source: str) -> None:
    """Refuse a worker count the database cannot share: SQLite has one writer process."""
    if workers > 1 and not settings.database.url.startswith("postgresql"):
        raise StartupError(
            f"{source}: {workers} workers share the worlds through PostgreSQL leases, but database.url is "
            "SQLite, which one process only may use; run one worker or use PostgreSQL",
            EXIT_CONFIG,
        )


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    owner: str
    admin_socket: Path
    notify_path: Path
    process: asyncio.subprocess.Process | None = None
    #: READY=1 seen since the process started (and no STOPPING=1 since).
    ready: bool = False
    #: READY=1 messages since the process started (a reload ends with one).
    readies: int = 0
    status: str = ""
    restarts: int = 0
    started_at: float = 0.0
    last_watchdog: float = 0.0
    #: A reload came while it was starting: SIGHUP it once it is ready (before, SIGHUP would kill it).
    reload_pending: bool = False
    notify_sock: socket.socket | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Runs the workers, the shared port, signals and sd_notify for ``run --workers N``."""

    def __init__(self, settings: Settings, config_path: Path | None, *, config_required: bool, workers: int) -> None:
        self.settings = settings
        self.config_path = config_path
        self.config_required = config_required
        self.notifier = SystemdNotifier()
        self.token: str | None = None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="scheduler-daemon-", dir=os.environ.get("RUNTIME_DIRECTORY")))
        base = settings.scheduler.instance_id
        self.workers = [
            Worker(i, f"{base}-w{i}", self.runtime_dir / f"w{i}.sock", self.runtime_dir / f"w{i}.notify")
            for i in range(workers)
        ]
        self._stopping = False
        self._stop_signals = 0
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        #: Set by every READY=1 of a worker (a reload waits for each worker's).
        self._readied = asyncio.Event()
        self._ready_sent = False
        #: Set with READY=1: a reload waits for it (before, RELOADING/READY would tell systemd it started).
        self._started = asyncio.Event()
        self._exit_code = EXIT_OK
        self._reload_ok = True
        self._progress = 0
        self._watchdog_usec: int | None = None
        r = self.registry = CollectorRegistry()
        Gauge("worldsched_workers", "Worker processes configured (run --workers)", registry=r).set(workers)
        self._up = Gauge(
            "worldsched_worker_up", "1 while the worker runs and reported ready, else 0", ["worker"], registry=r
        )
        self._restarts = Counter(
            "worldsched_worker_restarts", "Workers restarted after they exited", ["worker"], registry=r
        )
        self._reload_gauge = Gauge(
            "worldsched_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded, else 0",
            ["worker"],
            registry=r,
        )
        for w in self.workers:
            self._up.labels(w.name).set_function(functools.partial(_up, w))
            self._restarts.labels(w.name)
        self._reload_gauge.labels("supervisor").set_function(lambda: 1 if self._reload_ok else 0)
        self.process_registry = CollectorRegistry()
        ProcessCollector(registry=self.process_registry)
        PlatformCollector(registry=self.process_registry)
        GCCollector(registry=self.process_registry)

    # ------------------------------------------------------- port's view
    def serving(self) -> list[WorkerEndpoint]:
        """Workers running and ready."""
        return [WorkerEndpoint(w.name, w.owner, str(w.admin_socket)) for w in self.workers if w.running and w.ready]

    def unavailable(self) -> dict[str, str]:
        """Workers not serving, with why."""
        return {
            w.name: ("starting" if w.running else "restarting") for w in self.workers if not (w.running and w.ready)
        }

    def own_metrics(self) -> tuple[Collector, Collector]:
        """The supervisor's series, and its process figures."""
        return WithoutCreated(self.registry), WithoutCreated(self.process_registry)

    # -------------------------------------------------------------- run
    async def run(self) -> int:
        """Run until stopped; returns the exit code. Raises :class:`StartupError` if the port cannot be opened."""
        s = self.settings
        loop = asyncio.get_running_loop()
        log.info(
            "workers_starting",
            workers=len(self.workers),
            instance_ids=[w.owner for w in self.workers],
            runtime_dir=str(self.runtime_dir),
        )
        wd = watchdog_interval_seconds()
        if wd is not None and self.notifier.enabled:
            self._watchdog_usec = int(wd * 2 * 1_000_000)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(shutil.rmtree, self.runtime_dir, ignore_errors=True)
            listener = None
            if s.http.enabled:
                self.token = load_startup_token(s.http)
                _, open_files, _ = raise_open_files_limit()
                guard = connection_guard(s.http, open_files=open_files, database_pools=2)
                listener = AdminListener(s.http, guard, date_header=False)
                stack.push_async_callback(listener.close)
                self.process_registry.register(_PortCollector(guard))
            store = Store.from_url(
                s.database.url, pool_size=1, max_overflow=1, connect_timeout=s.database.connect_timeout_seconds
            )
            stack.push_async_callback(store.dispose)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, self._reload.set)
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            for w in self.workers:
                self._open_notify_socket(w)
                stack.callback(self._close_notify_socket, w)
            if listener is not None:
                proxy = WorkerProxy(
                    self, lambda ref: current_owner(store.engine, ref), timeout=s.http.request_timeout_seconds
                )
                await listener.serve(proxy, authenticated=self.token is not None)
            tasks = [asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self.workers]
            tasks += [
                asyncio.create_task(self._reload_loop(), name="reload"),
                asyncio.create_task(self._status_loop(), name="status"),
            ]
            if wd is not None and self.notifier.enabled:
                tasks.append(asyncio.create_task(watchdog_loop(self.notifier, wd, lambda: self._progress)))
            try:
                await self._stop.wait()
            finally:
                self._stopping = True
                self.notifier.stopping()
                if listener is not None:
                    await listener.close()
                await self._stop_workers()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        log.info("stopped", exit_code=self._exit_code)
        return self._exit_code

    # ---------------------------------------------------------- workers
    def _command(self, w: Worker) -> list[str]:
        config = ["--config", str(self.config_path)] if self.config_required and self.config_path else []
        return [
            sys.executable,
            "-m",
            "scheduler_daemon",
            *config,
            "run",
            "--worker-index",
            str(w.index),
            "--worker-socket",
            str(w.admin_socket),
            "--supervisor-pid",
            str(os.getpid()),
        ]

    def _environment(self, w: Worker) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (WATCHDOG_PID_ENV, WATCHDOG_USEC_ENV)}
        env[NOTIFY_SOCKET_ENV] = str(w.notify_path)
        env["SCHEDULER_SCHEDULER__INSTANCE_ID"] = w.owner
        env["SCHEDULER_SCHEDULER__WORKERS"] = "1"
        if self._watchdog_usec is not None:
            # The worker feeds the supervisor's watchdog as it would systemd's (see _check_watchdogs).
            env[WATCHDOG_USEC_ENV] = str(self._watchdog_usec)
        return env

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w``; restart it with backoff whenever it exits, until the supervisor stops."""
        backoff = RESTART_BACKOFF_SECONDS
        while not self._stopping:
            w.ready, w.readies, w.status, w.reload_pending = False, 0, "", False
            w.started_at = w.last_watchdog = time.monotonic()
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
            w.process = await asyncio.create_subprocess_exec(
                *self._command(w), env=self._environment(w), process_group=0
            )
            log.info("worker_started", worker=w.name, pid=w.process.pid, instance_id=w.owner)
            code = await w.process.wait()
            w.ready = False
            if self._stopping:
                return
            if not self._ready_sent:
                log.error("worker_start_failed", worker=w.name, exit_status=describe_exit(code))
                self._exit_code = code if code > 0 else EXIT_FAILURE
                self._stop.set()
                return
            ran = time.monotonic() - w.started_at
            backoff = RESTART_BACKOFF_SECONDS if ran >= STABLE_RUN_SECONDS else backoff
            w.restarts += 1
            self._restarts.labels(w.name).inc()
            log.error(
                "worker_exited",
                worker=w.name,
                exit_status=describe_exit(code),
                ran_seconds=round(ran, 1),
                restart_in_seconds=backoff,
                restarts=w.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_SECONDS)

    async def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for them (bounded), SIGKILL what is left; a dirty exit makes ours 1."""
        running = [w for w in self.workers if w.running]
        for w in running:
            self._signal(w, signal.SIGTERM)
        grace = self.settings.scheduler.tick_timeout_seconds + STOP_GRACE_SECONDS
        # One grace for all (they stop together): waited in turn, each would add its own.
        deadline = time.monotonic() + grace
        for w in running:
            assert w.process is not None
            try:
                remaining = max(deadline - time.monotonic(), 0.0)
                code = w.process.returncode
                if code is None:
                    code = await asyncio.wait_for(w.process.wait(), remaining)
            except TimeoutError:
                log.error("worker_stop_timeout", worker=w.name, waited_seconds=grace)
                with contextlib.suppress(ProcessLookupError):
                    w.process.kill()
                code = await w.process.wait()
            # -SIGTERM: still starting, before its handlers (a single daemon also ends so then).
            if code not in (0, -signal.SIGTERM):
                log.error("worker_stopped_uncleanly", worker=w.name, exit_status=describe_exit(code))
                if self._exit_code == EXIT_OK:
                    self._exit_code = EXIT_FAILURE
            else:
                log.info("worker_stopped", worker=w.name)

    # ----------------------------------------------------------- notify
    def _open_notify_socket(self, w: Worker) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(w.notify_path))
        sock.setblocking(False)
        w.notify_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify, w)

    def _close_notify_socket(self, w: Worker) -> None:
        if w.notify_sock is not None:
            asyncio.get_running_loop().remove_reader(w.notify_sock.fileno())
            w.notify_sock.close()
            w.notify_sock = None

    def _on_notify(self, w: Worker) -> None:
        assert w.notify_sock is not None
        while True:
            try:
                data = w.notify_sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            fields = dict(line.split("=", 1) for line in data.decode("utf-8", "replace").split("\n") if "=" in line)
            if "STATUS" in fields:
                w.status = fields["STATUS"]
            if fields.get("WATCHDOG") == "1":
                w.last_watchdog = time.monotonic()
            if fields.get("STOPPING") == "1":
                w.ready = False
            if "EXTEND_TIMEOUT_USEC" in fields and not self._ready_sent:
                # A worker registering many worlds asks for more start-up time: systemd must see it.
                with contextlib.suppress(ValueError):
                    seconds = int(fields["EXTEND_TIMEOUT_USEC"]) / 1_000_000
                    self.notifier.extend_timeout(seconds, self._status_line())
            if fields.get("READY") == "1":
                w.ready = True
                w.readies += 1
                w.last_watchdog = time.monotonic()
                self._readied.set()
                if w.reload_pending:
                    w.reload_pending = False
                    self._signal(w, signal.SIGHUP)
                self._maybe_ready()

    @staticmethod
    def _signal(w: Worker, sig: signal.Signals) -> None:
        if w.process is not None and w.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(sig)

    def _maybe_ready(self) -> None:
        if self._ready_sent or not all(w.ready for w in self.workers):
            return
        self._ready_sent = True
        self._started.set()
        self.notifier.ready(status=self._status_line())
        log.info("ready", workers=len(self.workers))

    # ------------------------------------------------------------ signals
    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_signals += 1
        if self._stop_signals > 1:
            log.warning("second_stop_signal", signal=sig.name)
            self._exit_code = EXIT_FAILURE
            for w in self.workers:
                self._signal(w, sig)
            return
        log.info("stop_requested", signal=sig.name)
        self._stopping = True
        self._stop.set()

    async def _reload_loop(self) -> None:
        # A SIGHUP while the workers start is honoured once they all are ready.
        await self._started.wait()
        while True:
            await self._reload.wait()
            await asyncio.sleep(RELOAD_SETTLE_SECONDS)  # a burst of SIGHUPs shares one reload
            self._reload.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Validate the config file again; forward SIGHUP to every worker only if it is valid."""
        self.notifier.reloading()
        log.info("config_reloading", path=str(self.config_path) if self.config_path else None)
        try:
            new = load_settings(self.config_path, required=self.config_required)
            check_new_settings(new, self.settings, running_token=self.token, config_path=self.config_path)
        except (SettingsError, ValueError) as exc:
            self._reload_ok = False
            log.error("config_reload_failed", error=str(exc))
            self.notifier.ready(status=f"reload failed, running the previous configuration: {str(exc)[:200]}")
            return False
        self.settings, _ = keep_restart_only(self.settings, new)
        # The supervisor's own lines follow [logging] as the workers' do.
        configure_logging(self.settings.logging.level, self.settings.logging.format)
        self._reload_ok = True
        # Only workers that reported ready have their SIGHUP handler; the others get it when they are.
        marks = {w.index: w.readies for w in self.workers if w.running and w.readies > 0}
        for w in self.workers:
            if w.index in marks:
                self._signal(w, signal.SIGHUP)
            elif w.running:
                w.reload_pending = True
        deadline = time.monotonic() + RELOAD_WAIT_SECONDS
        waiting = [w for w in self.workers if w.index in marks]
        while any(w.running and w.readies <= marks[w.index] for w in waiting) and time.monotonic() < deadline:
            self._readied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._readied.wait(), min(1.0, deadline - time.monotonic()))
        log.info("config_reload_forwarded", workers=len(marks))
        self.notifier.ready(status=self._status_line())
        return True

    # ------------------------------------------------------------- status
    def _status_line(self) -> str:
        up = sum(1 for w in self.workers if w.running and w.ready)
        text = f"{up}/{len(self.workers)} workers ready"
        restarts = sum(w.restarts for w in self.workers)
        if restarts:
            text += f", {restarts} restarts"
        if not self._reload_ok:
            text += "; last reload failed"
        return text + "".join(f"; w{w.index}: {w.status or '-'}" for w in self.workers)

    async def _status_loop(self) -> None:
        """STATUS= for systemctl, and the workers' watchdogs; each round is the supervisor's progress."""
        interval = STATUS_INTERVAL_SECONDS
        if self._watchdog_usec is not None:
            interval = min(interval, self._watchdog_usec / 4 / 1_000_000)
        last_status = 0.0
        while True:
            await asyncio.sleep(interval)
            self._progress += 1
            self._check_watchdogs()
            now = time.monotonic()
            if self._ready_sent and now - last_status >= STATUS_INTERVAL_SECONDS:
                self.notifier.status(self._status_line())
                last_status = now

    def _check_watchdogs(self) -> None:
        """Kill a worker that stopped feeding its watchdog (systemd would kill a single daemon); it restarts."""
        if self._watchdog_usec is None:
            return
        limit = self._watchdog_usec / 1_000_000
        for w in self.workers:
            if w.running and w.ready and time.monotonic() - w.last_watchdog > limit:
                log.error("worker_watchdog_timeout", worker=w.name, timeout_seconds=limit)
                self._signal(w, signal.SIGKILL)


def _up(w: Worker) -> float:
    return 1.0 if w.running and w.ready else 0.0


class _PortCollector(Collector):
    """The supervisor's own port (``worldsched_http_*``), next to each worker's socket."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        yield from http_connection_families(self.guard)


def describe_exit(code: int) -> str:
    """An exit status for the log: ``exit code 3`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_command(
    settings: Settings,
    config_path: Path | None,
    *,
    config_required: bool,
    workers: int | None,
    worker: WorkerRole | None,
) -> int:
    """``scheduler-daemon run``: one daemon, a supervisor of ``workers`` daemons, or one of its workers.

    ``workers`` (``--workers``) wins over ``scheduler.workers``. With one
    worker there is no supervisor at all: the daemon runs as it always did.
    """
    from scheduler_daemon.daemon import Daemon

    configure_logging(settings.logging.level, settings.logging.format)
    if worker is not None:
        # A string, as in the supervisor's lines about the worker and its metrics label.
        structlog.contextvars.bind_contextvars(worker=str(worker.index))
        return asyncio.run(Daemon(settings, config_path, config_required=config_required, worker=worker).run())
    count = workers if workers is not None else settings.scheduler.workers
    check_workers(settings, count, f"--workers {count}" if workers is not None else f"scheduler.workers ({count})")
    if count == 1:
        return asyncio.run(Daemon(settings, config_path, config_required=config_required).run())
    supervisor = Supervisor(settings, config_path, config_required=config_required, workers=count)
    return asyncio.run(supervisor.run())
