"""Log output of the daemon: JSON or console, and exceptions rendered without local variables."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from scheduler_daemon.logs import configure_logging, get_logger


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


def test_console_lines_name_their_logger_for_structlog_and_stdlib_records() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    get_logger("scheduler_daemon.probe").info("probe_info", world_id=3)
    logging.getLogger("scheduler_daemon.systemd").info("sd_notify_recovered", extra={"notify_socket": "/run/n"})
    first, second = out.getvalue().splitlines()
    assert "probe_info" in first and "scheduler_daemon.probe" in first and "world_id=3" in first
    assert "sd_notify_recovered" in second and "scheduler_daemon.systemd" in second and "/run/n" in second
    assert not first.startswith("<")  # a StringIO is no journal


def test_the_level_applies_to_the_package_not_to_libraries() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out)
    log = get_logger("scheduler_daemon.probe")
    assert log.is_enabled_for(logging.DEBUG)
    log.debug("probe_debug")
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    # A game's plug-in (decide function, sink) logs under its own name: at the configured level.
    logging.getLogger("my_game.behaviour").info("plugin_said_hello")
    structlog.get_logger("my_game.sink").info("plugin_structlog_hello")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "probe_debug",
        "plugin_said_hello",
        "plugin_structlog_hello",
    ]
    configure_logging("WARNING", "json", stream=out)  # a reload
    assert not log.is_enabled_for(logging.INFO)
