"""``retry_transient``: the first attempt runs outside tenacity; retries count it."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from scheduler_daemon.retry import retry_after, retry_transient


class _Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns the call count."""

    def __init__(self, failures: int, error: type[BaseException] = ConnectionResetError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"attempt {self.calls}")
        return self.calls


async def test_success_at_first_attempt_logs_nothing() -> None:
    func = _Flaky(0)
    with capture_logs() as logs:
        assert await retry_transient("tick", func, max_attempts=3) == 1
    assert logs == []


async def test_transient_failures_are_retried_and_logged_with_attempt_numbers() -> None:
    func = _Flaky(2)
    with capture_logs() as logs:
        assert await retry_transient("tick", func, max_attempts=3, multiplier=0.001, max_wait=0.001, world_id=7) == 3
    assert [(e["event"], e["operation"], e["attempt"], e["world_id"]) for e in logs] == [
        ("retrying", "tick", 1, 7),
        ("retrying", "tick", 2, 7),
    ]
    assert logs[0]["error"] == "ConnectionResetError: attempt 1"


async def test_max_attempts_counts_the_first_attempt() -> None:
    func = _Flaky(5)
    with pytest.raises(ConnectionResetError, match="attempt 3"):
        await retry_transient("tick", func, max_attempts=3, multiplier=0.001, max_wait=0.001)
    assert func.calls == 3


async def test_a_single_attempt_is_never_retried() -> None:
    func = _Flaky(1)
    with pytest.raises(ConnectionResetError, match="attempt 1"):
        await retry_transient("tick", func, max_attempts=1)
    assert func.calls == 1


async def test_other_errors_propagate_at_once() -> None:
    func = _Flaky(1, error=ValueError)
    with pytest.raises(ValueError, match="attempt 1"):
        await retry_transient("tick", func, max_attempts=3)
    assert func.calls == 1


async def test_max_seconds_already_spent_by_the_first_attempt_stops_retrying() -> None:
    func = _Flaky(5)
    with pytest.raises(ConnectionResetError, match="attempt 1"):
        await retry_transient("tick", func, max_seconds=0.0, multiplier=0.001, max_wait=0.001)
    assert func.calls == 1


async def test_retry_after_needs_the_first_start_for_a_time_budget() -> None:
    async def never() -> int:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="max_seconds needs the first attempt's start"):
        await retry_after(ConnectionResetError("gone"), "unit", never, max_seconds=1.0)
