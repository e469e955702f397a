"""The metrics registry: names match the dashboard/alerts, values follow real ticks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon.clock import VirtualClock
from scheduler_daemon.metrics import SchedulerMetrics
from scheduler_daemon.metrics_exposition import expose
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.support.helpers import drop_trigger, install_failing_trigger, make_world, npc_rows
from tests.system.test_monitoring import COUNTERS, GAUGES, HISTOGRAMS, KNOWN_METRICS, OPTIONAL_COUNTERS


def scrape(metrics: SchedulerMetrics) -> dict[str, Any]:
    """Parse the exposition text exactly as Prometheus would read it."""
    return {f.name: f for f in text_string_to_metric_families(expose(metrics.snapshot()).body.decode())}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((sample, labels))


def runner_with_metrics(store: Store, **limits: Any) -> tuple[SchedulerLoopRunner, SchedulerMetrics]:
    runner = SchedulerLoopRunner(WorldScheduler(store), store, clock=VirtualClock(), limits=RunnerLimits(**limits))
    metrics = SchedulerMetrics(version="1.2.3", runner=runner, reload_status=lambda: (True, 1700000000.0))
    runner.observer = metrics
    return runner, metrics


def test_exported_families_are_exactly_the_ones_dashboard_and_alerts_use() -> None:
    metrics = SchedulerMetrics(version="x", leases_held=lambda: 0)
    metrics.job_counts = {"pending": 1}
    metrics.world_registered(1)
    metrics.world_npc_ticks.labels(world_id="1", tier="detailed").inc()
    scraped = scrape(metrics)
    families = {name: f for name, f in scraped.items() if name.startswith("worldsched_")}
    expected = set(GAUGES) | {c.removesuffix("_total") for c in {**COUNTERS, **OPTIONAL_COUNTERS}} | set(HISTOGRAMS)
    assert set(families) == expected
    # Every sample name and label set is one the monitoring tests know (no _created series).
    for family in families.values():
        for sample in family.samples:
            assert sample.name in KNOWN_METRICS, sample.name
            assert set(sample.labels) == KNOWN_METRICS[sample.name], sample.name
    # Process and Python collectors stay on.
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_collections"} <= set(
        scraped
    )
    assert not any(s.name.endswith("_created") for f in scraped.values() for s in f.samples)


def test_each_daemon_has_its_own_registry() -> None:
    a, b = SchedulerMetrics(version="a"), SchedulerMetrics(version="b")
    a.ticks_missed(1, 3)
    assert value(scrape(a), "worldsched_ticks_missed_total") == 3
    assert value(scrape(b), "worldsched_ticks_missed_total") == 0


async def test_metrics_follow_ticks(store: Store) -> None:
    runner, metrics = runner_with_metrics(store)
    w1, _ = await make_world(store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2, Tier.AMBIENT: 3})
    w2, _ = await make_world(store, simulation={"timeScale": 1, "pauseSimulation": True})
    bad, _ = await make_world(store, simulation={"tickIntervalSeconds": "fast"})
    await runner.discover()
    before = scrape(metrics)
    assert value(before, "worldsched_worlds", state="running") == 1
    assert value(before, "worldsched_worlds", state="paused") == 1
    assert value(before, "worldsched_worlds", state="isolated") == 1
    assert value(before, "worldsched_worlds", state="failing") == 0
    assert value(before, "worldsched_npcs", tier="detailed") == 2
    assert value(before, "worldsched_npcs", tier="ambient") == 3
    assert value(before, "worldsched_npcs", tier="frozen") == 0
    assert value(before, "worldsched_ticks_total", outcome="ok") == 0
    assert value(before, "worldsched_build_info", version="1.2.3") == 1
    assert value(before, "worldsched_config_last_reload_successful") == 1
    assert value(before, "worldsched_config_last_reload_success_timestamp_seconds") == 1700000000.0
    assert value(before, "worldsched_world_ticks_total", world_id=str(w1)) == 0

    await runner.run_until(3.0)
    after = scrape(metrics)
    assert value(after, "worldsched_ticks_total", outcome="ok") == 6  # two worlds × 3 ticks
    assert value(after, "worldsched_world_ticks_total", world_id=str(w1)) == 3
    assert value(after, "worldsched_world_time_seconds", world_id=str(w1)) == pytest.approx(180.0)
    assert value(after, "worldsched_world_time_seconds", world_id=str(w2)) == 0.0
    decided = {Tier(r[1]): 0 for r in await npc_rows(store, w1)}
    for row in await npc_rows(store, w1):
        decided[Tier(row[1])] += row[3]
    assert decided[Tier.DETAILED] > 0
    assert value(after, "worldsched_npc_ticks_total", tier="detailed") == decided[Tier.DETAILED]
    assert value(after, "worldsched_npc_ticks_total", tier="ambient") == decided[Tier.AMBIENT]
    assert value(after, "worldsched_world_npc_ticks_total", world_id=str(w1), tier="detailed") == decided[Tier.DETAILED]
    assert value(after, "worldsched_tick_duration_seconds_count") == 6
    assert value(after, "worldsched_tick_lag_seconds_count") == 6
    assert value(after, "worldsched_tick_lag_seconds_bucket", le="0.001") == 6  # virtual clock: never late
    assert value(after, "worldsched_npc_decision_lag_seconds", tier="detailed") >= 0.0
    assert str(bad) not in {s.labels.get("world_id") for s in after["worldsched_world_time_seconds"].samples}


async def test_failed_ticks_count_errors_and_db_errors(store: Store) -> None:
    runner, metrics = runner_with_metrics(store, backoff_base_seconds=1.0)
    world_id, _ = await make_world(store, npcs_per_tier={Tier.DETAILED: 1})
    await runner.add_world(world_id)
    await install_failing_trigger(store, "npcs", world_id)
    try:
        await runner.run_until(1.0)
    finally:
        await drop_trigger(store, "npcs")
    families = scrape(metrics)
    assert value(families, "worldsched_ticks_total", outcome="error") == 1
    assert value(families, "worldsched_db_errors_total") == 1
    assert value(families, "worldsched_worlds", state="failing") == 1
    assert value(families, "worldsched_world_ticks_total", world_id=str(world_id)) == 0


async def test_a_world_failing_inside_a_batch_counts_only_its_own_tick_as_an_error(store: Store) -> None:
    runner, metrics = runner_with_metrics(store)
    good, _ = await make_world(store, name="good", npcs_per_tier={Tier.DETAILED: 1})
    bad, _ = await make_world(store, name="bad", npcs_per_tier={Tier.DETAILED: 1})
    for world_id in (good, bad):
        await runner.add_world(world_id)  # both due at 1.0: one batch, one grouped commit
    await install_failing_trigger(store, "npcs", bad)
    try:
        await runner.run_until(1.0)
    finally:
        await drop_trigger(store, "npcs")
    families = scrape(metrics)
    assert value(families, "worldsched_ticks_total", outcome="ok") == 1
    assert value(families, "worldsched_ticks_total", outcome="error") == 1
    assert value(families, "worldsched_db_errors_total") == 1
    assert value(families, "worldsched_world_ticks_total", world_id=str(good)) == 1
    assert value(families, "worldsched_world_ticks_total", world_id=str(bad)) == 0


async def test_timeouts_and_missed_slots_are_counted(store: Store) -> None:
    runner, metrics = runner_with_metrics(store)
    world_id, _ = await make_world(store, npcs_per_tier={Tier.DETAILED: 1})
    await runner.add_world(world_id)
    await runner.run_until(1.0)
    runner.clock.set(5.5)  # type: ignore[attr-defined]  # the loop stalled: slots 2..4 passed unserved
    await runner.run_until(5.5)
    families = scrape(metrics)
    assert value(families, "worldsched_ticks_missed_total") == 3
    # Cumulative buckets: the first tick was on time, the second served 0.5 s late.
    assert value(families, "worldsched_tick_lag_seconds_bucket", le="0.25") == 1
    assert value(families, "worldsched_tick_lag_seconds_bucket", le="0.5") == 2
    runner.set_limits(dataclasses.replace(runner.limits, tick_timeout_seconds=1e-9))
    await runner.run_until(6.0)
    assert value(scrape(metrics), "worldsched_ticks_total", outcome="timeout") == 1


async def test_per_world_series_vanish_on_unregister_and_can_be_switched_off(store: Store) -> None:
    runner, metrics = runner_with_metrics(store)
    w1, _ = await make_world(store, npcs_per_tier={Tier.DETAILED: 1})
    w2, _ = await make_world(store, npcs_per_tier={Tier.DETAILED: 1})
    await runner.add_world(w1)
    await runner.add_world(w2)
    await runner.run_until(2.0)
    await runner.remove_world(w1)
    families = scrape(metrics)
    world_ids = {s.labels["world_id"] for s in families["worldsched_world_ticks"].samples}
    assert world_ids == {str(w2)}
    assert {s.labels["world_id"] for s in families["worldsched_world_npc_ticks"].samples} == {str(w2)}
    assert {s.labels["world_id"] for s in families["worldsched_world_time_seconds"].samples} == {str(w2)}
    metrics.per_world = False
    await runner.run_until(4.0)
    families = scrape(metrics)
    assert [s for f in families.values() for s in f.samples if "world_id" in s.labels] == []
    assert value(families, "worldsched_ticks_total", outcome="ok") == 6  # aggregates keep counting
    metrics.per_world = True
    # Back at 0 before the next tick, as at registration: rate() counts that tick.
    assert value(scrape(metrics), "worldsched_world_ticks_total", world_id=str(w2)) == 0
    await runner.run_until(5.0)
    assert value(scrape(metrics), "worldsched_world_time_seconds", world_id=str(w2)) > 0


def test_job_and_lease_families_carry_no_made_up_values_until_wired() -> None:
    metrics = SchedulerMetrics(version="x", process_collectors=False)
    families = scrape(metrics)
    assert families["worldsched_jobs"].samples == []
    assert families["worldsched_leases_held"].samples == []
    # No runner, no change listener (SQLite): no samples either.
    for family in (
        "worldsched_world_changes_applied",
        "worldsched_change_notifications",
        "worldsched_change_listener_up",
    ):
        assert families[family].samples == []
    metrics.job_counts = {"pending": 4, "running": 1}
    metrics.leases_held = lambda: 7
    metrics.lease_claimed(1)
    metrics.lease_lost(1)
    families = scrape(metrics)
    assert value(families, "worldsched_jobs", status="pending") == 4
    # A status the provider did not count is absent, never a made-up 0.
    assert {s.labels["status"] for s in families["worldsched_jobs"].samples} == {"pending", "running"}
    assert value(families, "worldsched_leases_held") == 7
    assert value(families, "worldsched_lease_claims_total") == 1
    assert value(families, "worldsched_lease_lost_total") == 1


def test_failed_reload_sets_the_gauge_to_zero() -> None:
    status = {"ok": True}
    metrics = SchedulerMetrics(version="x", process_collectors=False, reload_status=lambda: (status["ok"], 5.0))
    assert value(scrape(metrics), "worldsched_config_last_reload_successful") == 1
    status["ok"] = False
    families = scrape(metrics)
    assert value(families, "worldsched_config_last_reload_successful") == 0
    assert value(families, "worldsched_config_last_reload_success_timestamp_seconds") == 5.0


async def test_refreshers_feed_database_values_and_failures_count_as_db_errors() -> None:
    calls = {"n": 0}

    async def count_jobs() -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("database went away")
        return {"pending": calls["n"]}

    metrics = SchedulerMetrics(version="x", process_collectors=False, job_counts=count_jobs)
    await metrics.refresh()
    assert value(scrape(metrics), "worldsched_jobs", status="pending") == 1
    await metrics.refresh()  # fails: the last good value stays, the error is counted
    families = scrape(metrics)
    assert value(families, "worldsched_jobs", status="pending") == 1
    assert value(families, "worldsched_db_errors_total") == 1
