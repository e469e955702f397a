"""Retrying whole units of work on transient database errors (tenacity).

A unit of work is a function that opens its own transaction (a tick, a
discovery pass, the first connection): on a disconnect or a serialization
failure the whole function runs again, never a single statement, so a retry
can never see half of an earlier attempt.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from scheduler_daemon.logs import get_logger
from scheduler_daemon.store.errors import is_transient

log = get_logger("scheduler_daemon.retry")

T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line log fields and errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


async def retry_transient(
    what: str,
    func: Callable[[], Awaitable[T]],
    *,
    max_seconds: float | None = None,
    max_attempts: int | None = None,
    min_wait: float = 0.0,
    multiplier: float = 0.2,
    max_wait: float = 5.0,
    **log_fields: object,
) -> T:
    """Run ``func`` and run it again on transient database errors.

    Waits are exponential with full jitter (``multiplier × 2^n``, at most
    ``max_wait``) so many daemons reconnecting at once do not stampede. Gives
    up after ``max_seconds`` and/or ``max_attempts`` and re-raises the last
    error; other errors propagate at once. Each retry is logged at WARNING
    (``retrying``, with ``operation=what``, the attempt number and the error):
    ``what`` is a snake_case name of the unit of work.
    """
    # The first attempt runs outside tenacity: its per-call state costs more
    # than a batch of cheap ticks (docs/performance.md).
    started = time.monotonic()
    try:
        return await func()
    except Exception as exc:
        if not is_transient(exc) or max_attempts == 1:
            raise
        failed = exc
    return await retry_after(
        failed,
        what,
        func,
        started=started,
        max_seconds=max_seconds,
        max_attempts=max_attempts,
        min_wait=min_wait,
        multiplier=multiplier,
        max_wait=max_wait,
        **log_fields,
    )


async def retry_after(
    failed: BaseException,
    what: str,
    func: Callable[[], Awaitable[T]],
    *,
    started: float | None = None,
    max_seconds: float | None = None,
    max_attempts: int | None = None,
    min_wait: float = 0.0,
    multiplier: float = 0.2,
    max_wait: float = 5.0,
    **log_fields: object,
) -> T:
    """:func:`retry_transient` for a caller that ran the first attempt itself and saw it fail.

    ``failed`` is that attempt's transient error; it counts as attempt 1
    (logged and waited for). With ``max_seconds``, ``started`` is required:
    the first attempt's ``time.monotonic()`` start, which counts against the
    budget. The runner's batches use this: on the hot path even
    :func:`retry_transient`'s own coroutine and arguments show.
    """
    replay: BaseException | None = failed
    stop: stop_base = stop_after_attempt(max_attempts or 1_000_000)
    if max_seconds is not None:
        if started is None:
            raise ValueError("retry_after: max_seconds needs the first attempt's start")
        # tenacity's clock starts now; the first attempt already used some of the budget.
        stop = stop | stop_after_delay(max(max_seconds - (time.monotonic() - started), 0.0))

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "retrying",
            operation=what,
            attempt=state.attempt_number,
            error=first_line(exc) if exc else None,
            retry_in_seconds=round(state.upcoming_sleep, 3),
            **log_fields,
        )

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=multiplier, max=max_wait, min=min_wait),
        stop=stop,
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            if replay is not None:
                # Replays the first attempt's failure so tenacity counts, logs and waits for it.
                failed_first, replay = replay, None
                raise failed_first
            return await func()
    raise AssertionError("unreachable")  # pragma: no cover
