"""How much real time the first tick of a world adopted by a runner covers (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduler_daemon.runner.adoption import first_tick_covers

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def test_the_real_time_since_the_last_commit() -> None:
    assert first_tick_covers(NOW - timedelta(seconds=0.25), NOW, 1.0) == 0.25


def test_at_most_one_interval() -> None:
    assert first_tick_covers(NOW - timedelta(hours=3), NOW, 2.0) == 2.0


def test_nothing_for_a_stamp_ahead_of_our_clock() -> None:
    assert first_tick_covers(NOW + timedelta(seconds=5), NOW, 1.0) == 0.0


def test_one_interval_for_a_world_never_ticked() -> None:
    assert first_tick_covers(None, NOW, 1.5) == 1.5


def test_a_naive_stamp_is_utc() -> None:
    # SQLite hands timestamps back naive.
    assert first_tick_covers((NOW - timedelta(seconds=0.5)).replace(tzinfo=None), NOW, 1.0) == 0.5
