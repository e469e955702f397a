"""Pure-Python systemd integration: ``sd_notify(3)`` and the service watchdog.

This deliberately avoids ``libsystemd``/``python-systemd`` so the daemon has no
native dependency and behaves identically in containers, CI and developer
machines. When ``$NOTIFY_SOCKET`` is not set (not running under systemd, or a
unit with ``Type=simple``) every notification is a cheap no-op.

Protocol summary (see ``sd_notify(3)``): the service sends newline-separated
``KEY=VALUE`` assignments as a single datagram to the ``AF_UNIX``/``SOCK_DGRAM``
socket named by ``$NOTIFY_SOCKET``. A name starting with ``@`` denotes a Linux
abstract-namespace socket, whose kernel address starts with a NUL byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = [
    "SystemdNotifier",
    "watchdog_interval_seconds",
    "watchdog_loop",
]

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _monotonic_usec() -> int:
    """Return ``CLOCK_MONOTONIC`` in microseconds, the clock systemd expects."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _resolve_address(path: str) -> bytes | None:
    """Translate a ``$NOTIFY_SOCKET`` value into a kernel ``AF_UNIX`` address.

    Returns ``None`` for values we cannot use (empty, relative paths, or the
    ``vsock:`` form used for VMs, which is out of scope here).
    """
    if not path:
        return None
    if path.startswith("@"):
        # Abstract namespace: systemd spells the leading NUL byte as "@".
        return b"\0" + os.fsencode(path[1:])
    if path.startswith("/"):
        return os.fsencode(path)
    return None


class SystemdNotifier:
    """Send ``sd_notify`` messages to the service manager.

    Build it with no argument to read ``$NOTIFY_SOCKET`` from the environment
    (or from ``env``), or pass ``socket_path`` explicitly. A notifier without a
    usable socket is *disabled*: :meth:`notify` then returns ``False`` without
    doing anything.

    Sending never raises for I/O problems: a notification must never crash the
    daemon, so failures are logged and reported via the ``False`` return value.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Create a notifier.

        Args:
            socket_path: explicit notification socket (filesystem path or
                ``@abstract-name``). When ``None``, ``$NOTIFY_SOCKET`` is used.
            env: environment to read ``NOTIFY_SOCKET`` from; defaults to
                :data:`os.environ`. Ignored when ``socket_path`` is given.
        """
        if socket_path is None:
            socket_path = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
        self._socket_path = socket_path
        self._address = _resolve_address(socket_path)
        if socket_path and self._address is None:
            logger.warning("notify_socket_unsupported", extra={"notify_socket": socket_path})
        # Log the first failure of a streak loudly and the rest quietly, so a
        # broken socket does not flood the journal on every watchdog ping.
        self._failing = False

    @property
    def enabled(self) -> bool:
        """Whether a usable notification socket is configured."""
        return self._address is not None

    @property
    def socket_path(self) -> str:
        """The configured socket as given (``""`` when none)."""
        return self._socket_path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self._socket_path!r})"

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` strings) as one datagram.

        Returns ``True`` when the datagram was handed to the kernel, ``False``
        when the notifier is disabled, a field is malformed, or sending failed
        (the error is logged, never raised).
        """
        if self._address is None:
            return False
        if not fields:
            logger.error("sd_notify_without_fields")
            return False
        for field in fields:
            # A newline would smuggle in an extra assignment; "=" is mandatory.
            if "\n" in field or "=" not in field:
                logger.error("sd_notify_field_malformed", extra={"field": field})
                return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the event loop if systemd's queue is full.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            logger.log(
                level,
                "sd_notify_failed",
                extra={
                    "notify_socket": self._socket_path,
                    "error": str(exc),
                    "fields": [f.partition("=")[0] for f in fields],
                },
            )
            self._failing = True
            return False
        if self._failing:
            logger.info("sd_notify_recovered", extra={"notify_socket": self._socket_path})
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Report start-up (or reload) completion, optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        """Report that a configuration reload has begun.

        ``MONOTONIC_USEC`` must accompany ``RELOADING=1`` in the same datagram:
        ``Type=notify-reload`` (systemd >= 253) uses it to tell this reload
        apart from an earlier one. Send :meth:`ready` when the reload is done.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for ``seconds`` more before a start-up (or reload) timeout, e.g. while registering many worlds.

        ``EXTEND_TIMEOUT_USEC`` (systemd >= 236) moves the running timeout to
        now + ``seconds``; send it again before it runs out, and only while
        making progress, so a start-up that hangs still times out.
        """
        fields = [f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def stopping(self) -> bool:
        """Report that graceful shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Set the free-form status shown by ``systemctl status`` (one line)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Feed the service watchdog (``WatchdogSec=``)."""
        return self.notify("WATCHDOG=1")


def _one_line(text: str) -> str:
    """Collapse ``text`` to one line: STATUS= must not contain newlines."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def watchdog_interval_seconds(
    env: Mapping[str, str] = os.environ,
    pid: int | None = None,
) -> float | None:
    """Return how often to ping the watchdog, or ``None`` if it is not enabled.

    systemd exports ``WATCHDOG_USEC`` (and usually ``WATCHDOG_PID``) when the
    unit sets ``WatchdogSec=``. Following ``sd_watchdog_enabled(3)`` we ping at
    half the timeout so a single late ping does not trigger a restart. The
    variables are ignored when ``WATCHDOG_PID`` names another process (they
    were inherited, not meant for us) or when any value is malformed.

    Args:
        env: environment to read; defaults to :data:`os.environ`.
        pid: our process id; defaults to :func:`os.getpid`.
    """
    raw_usec = env.get(WATCHDOG_USEC_ENV)
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        logger.warning("watchdog_env_invalid", extra={"variable": WATCHDOG_USEC_ENV, "value": raw_usec})
        return None
    if usec <= 0:
        logger.warning("watchdog_env_invalid", extra={"variable": WATCHDOG_USEC_ENV, "value": raw_usec})
        return None

    raw_pid = env.get(WATCHDOG_PID_ENV)
    if raw_pid is not None:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            logger.warning("watchdog_env_invalid", extra={"variable": WATCHDOG_PID_ENV, "value": raw_pid})
            return None
        if watchdog_pid != (os.getpid() if pid is None else pid):
            return None
    return usec / 2 / 1_000_000


async def watchdog_loop(
    notifier: SystemdNotifier,
    interval: float,
    progress: Callable[[], int],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Feed the systemd watchdog while the daemon makes progress.

    Every ``interval`` seconds ``progress()`` is sampled; ``WATCHDOG=1`` is sent
    only if the value grew since the last ping. A wedged tick loop therefore
    stops feeding the watchdog and systemd restarts the service, which a
    plain timer-driven ping (alive as long as the event loop is) would hide.

    ``progress`` must be a monotonically increasing counter that advances
    even when there is no work (e.g. scheduler-loop iterations, not ticks of
    worlds), otherwise an idle daemon would be restarted.

    Runs until cancelled. ``sleep`` is injectable for tests.

    Raises:
        ValueError: if ``interval`` is not positive.
    """
    if not interval > 0:  # also rejects NaN
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    last = _sample(progress)
    while True:
        await sleep(interval)
        current = _sample(progress)
        if current is not None and (last is None or current > last):
            notifier.watchdog()
            last = current
        else:
            logger.warning(
                "watchdog_ping_withheld", extra={"no_progress_seconds": round(interval, 1), "counter": current}
            )


def _sample(progress: Callable[[], int]) -> int | None:
    """Call ``progress``; a failing probe counts as "no progress", not a crash."""
    try:
        return progress()
    except Exception:
        logger.exception("watchdog_probe_failed")
        return None
