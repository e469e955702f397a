"""Log output of the daemon: JSON or console, and exceptions rendered without local variables."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from scheduler_daemon.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _fail() -> None:
    admin_token = "s3cr3t-token-value"  # a frame local that must not reach the log
    raise RuntimeError(f"boom ({len(admin_token)})")


def test_json_exception_has_frames_but_no_locals() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    try:
        _fail()
    except RuntimeError:
        structlog.get_logger("t").exception("tick_failed", world_id=7)
    event = json.loads(out.getvalue().strip().splitlines()[-1])
    assert event["event"] == "tick_failed" and event["world_id"] == 7
    (exc,) = event["exception"]
    assert exc["exc_type"] == "RuntimeError" and exc["exc_value"] == "boom (18)"
    assert any(frame["name"] == "_fail" for frame in exc["frames"])
    assert all(not frame.get("locals") for frame in exc["frames"])
    assert "s3cr3t" not in out.getvalue()


def test_console_exception_is_a_plain_traceback_without_locals() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    try:
        _fail()
    except RuntimeError:
        structlog.get_logger("t").exception("tick_failed")
    text = out.getvalue()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom (18)" in text
    assert "s3cr3t" not in text
