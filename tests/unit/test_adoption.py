"""How much real time the first tick of a world adopted by a runner covers (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduler_daemon.runner.adoption import first_tick_covers

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def test_the_real_time_since_the_last_commit() -> None:
    assert first_tick_covers(NOW - timedelta(seconds=0.25), NOW, 1.0, 60.0) == 0.25


def test_a_cron_slower_than_the_interval_keeps_the_real_rate() -> None:
    # A cron every second and worlds ticking every 0.5 s: each call covers the second since the last.
    assert first_tick_covers(NOW - timedelta(seconds=1), NOW, 0.5, 60.0) == 1.0


def test_at_most_max_catch_up_seconds_as_a_late_tick_of_the_daemon() -> None:
    assert first_tick_covers(NOW - timedelta(hours=3), NOW, 2.0, 60.0) == 60.0


def test_nothing_for_a_stamp_ahead_of_our_clock() -> None:
    assert first_tick_covers(NOW + timedelta(seconds=5), NOW, 1.0, 60.0) == 0.0


def test_one_interval_for_a_world_never_ticked() -> None:
    assert first_tick_covers(None, NOW, 1.5, 60.0) == 1.5


def test_a_naive_stamp_is_utc() -> None:
    # SQLite hands timestamps back naive.
    assert first_tick_covers((NOW - timedelta(seconds=0.5)).replace(tzinfo=None), NOW, 1.0, 60.0) == 0.5
