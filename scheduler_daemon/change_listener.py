"""``ChangeListener``: the changes PostgreSQL notifies, applied to the runner before the worlds' next tick.

Runs as a task next to the runner loop on the same event loop. Each wakeup
takes what was notified within ``COALESCE_SECONDS`` of the first notification
(at most about ``MAX_NOTIFICATIONS``), and hands the distinct world ids to
:meth:`~scheduler_daemon.runner.SchedulerLoopRunner.apply_changes`; what
arrives meanwhile waits in the connection for the next wakeup, so the work per
wakeup is bounded and ticks run in between (every step awaits the database).

A lost connection is retried with jittered exponential backoff, logged once
per outage; once listening again (or listening for the first time after the
runner loop started), a discovery pass runs at once, since notifications sent
meanwhile are lost. The discovery poll stays the safety net.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from scheduler_daemon.logs import get_logger
from scheduler_daemon.retry import first_line
from scheduler_daemon.store.notifications import CHANNEL, ChangeNotifications

log = get_logger("scheduler_daemon.changes")

#: After a first notification, wait this long for the rest of a burst (one transaction's rows arrive at once).
COALESCE_SECONDS = 0.02
#: Notifications taken per wakeup, at most (about: one packet may carry a few more).
MAX_NOTIFICATIONS = 1000
#: A connection quiet this long is checked with a query.
PROBE_SECONDS = 30.0
#: Reconnect backoff (tenacity): jittered between RECONNECT_MIN and ``min(RECONNECT_MAX, RECONNECT_BASE × 2^n)``.
RECONNECT_BASE_SECONDS = 0.2
RECONNECT_MIN_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 10.0
#: Largest world id (``worlds.id`` is a 32-bit integer).
MAX_WORLD_ID = 2**31 - 1
#: Payloads that are not a world id are logged at most this often.
BAD_PAYLOAD_LOG_SECONDS = 60.0


class ChangeTarget(Protocol):
    """What the listener drives (:class:`~scheduler_daemon.runner.SchedulerLoopRunner`)."""

    async def apply_changes(self, world_ids: Collection[int]) -> None: ...

    def discover_soon(self) -> bool: ...


class ChangeListener:
    """LISTENs for world changes and applies them; :meth:`run` until cancelled."""

    def __init__(self, notifications: ChangeNotifications, target: ChangeTarget) -> None:
        self.notifications = notifications
        self.target = target
        #: Notifications received (``worldsched_change_notifications_total``).
        self.received = 0
        #: Set while the connection listens.
        self.listening = asyncio.Event()
        self._outage_since: float | None = None
        self._failed_attempts = 0
        self._bad_payload_logged_at = -BAD_PAYLOAD_LOG_SECONDS

    async def run(self) -> None:
        """Listen, apply, reconnect after a failure; until cancelled (the connection is closed then)."""
        try:
            while True:
                await self._listen()
                try:
                    while True:
                        await self._next_batch()
                except Exception as exc:
                    self.listening.clear()
                    await self.notifications.close()
                    self._interrupted(exc)
        finally:
            self.listening.clear()
            await self.notifications.close()

    async def _listen(self) -> None:
        """Connect and LISTEN, retried with jittered exponential backoff until it works."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(
                multiplier=RECONNECT_BASE_SECONDS, max=RECONNECT_MAX_SECONDS, min=RECONNECT_MIN_SECONDS
            ),
            before_sleep=self._connect_failed,
        ):
            with attempt:
                await self.notifications.listen()
        self._resumed()

    async def _next_batch(self) -> None:
        payloads = await self.notifications.receive(
            wait=PROBE_SECONDS, window=COALESCE_SECONDS, limit=MAX_NOTIFICATIONS
        )
        if not payloads:
            return
        self.received += len(payloads)
        world_ids: set[int] = set()
        bad: list[str] = []
        for payload in payloads:
            world_id = _world_id(payload)
            if world_id is None:
                bad.append(payload)
            else:
                world_ids.add(world_id)
        if bad:
            self._bad_payloads(bad)
        if world_ids:
            log.debug("changes_notified", world_ids=sorted(world_ids), notifications=len(payloads))
            await self.target.apply_changes(world_ids)

    def _bad_payloads(self, bad: list[str]) -> None:
        now = time.monotonic()
        if now - self._bad_payload_logged_at >= BAD_PAYLOAD_LOG_SECONDS:
            self._bad_payload_logged_at = now
            log.warning(
                "change_notification_ignored",
                channel=CHANNEL,
                payload=bad[0][:100],
                ignored=len(bad),
            )

    def _connect_failed(self, state: RetryCallState) -> None:
        self._failed_attempts += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        self._interrupted(exc)

    def _interrupted(self, exc: BaseException | None) -> None:
        """One WARNING per outage (until listening again)."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "change_notifications_interrupted",
                error=first_line(exc) if exc is not None else None,
            )

    def _resumed(self) -> None:
        self.listening.set()
        if self._outage_since is not None:
            log.info(
                "change_notifications_resumed",
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
                attempts=self._failed_attempts,
            )
        else:
            log.info("change_notifications_listening", channel=CHANNEL)
        # Whatever was notified before (an outage, or a first LISTEN later than the loop's start)
        # is lost: a discovery pass picks it up. A no-op while the loop has not started.
        self.target.discover_soon()
        self._outage_since = None
        self._failed_attempts = 0


def _world_id(payload: str) -> int | None:
    """The world id a payload names (decimal digits, within the id column's range), else None."""
    text = payload.strip()
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value <= MAX_WORLD_ID else None
