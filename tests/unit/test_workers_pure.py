"""The pure parts of ``run --workers``: merging expositions with a ``worker`` label, and which world a path names."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon.http.proxy import world_ref
from scheduler_daemon.metrics_exposition import OPENMETRICS_ACCEPT, WithoutCreated, expose
from scheduler_daemon.metrics_merge import MergedMetrics, parse_exposition


def _exposition(ticks: int, world: str) -> bytes:
    """A worker's answer to the supervisor (OpenMetrics)."""
    r = CollectorRegistry()
    Counter("worldsched_ticks", "Ticks", ["outcome"], registry=r).labels("ok").inc(ticks)
    Gauge("worldsched_leases_held", "Leases", registry=r).set(ticks)
    Gauge("worldsched_world_time_seconds", "Time", ["world_id"], registry=r).labels(world).set(1.5)
    Histogram("worldsched_tick_lag_seconds", "Lag", buckets=(0.1, 1.0), registry=r).observe(0.05)
    return expose(WithoutCreated(r), accept=OPENMETRICS_ACCEPT).body


def _merged() -> MergedMetrics:
    own = CollectorRegistry()
    Gauge("worldsched_worker_up", "Up", ["worker"], registry=own).labels("0").set(1)
    return MergedMetrics(
        [
            ("0", parse_exposition(_exposition(3, "1"))),
            ("1", parse_exposition(_exposition(5, "2"))),
            (None, own.collect()),
        ]
    )


def test_merged_exposition_is_one_valid_exposition_with_every_sample_labelled() -> None:
    text = expose(_merged()).body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ticks = {s.labels["worker"]: s.value for s in families["worldsched_ticks"].samples if s.name.endswith("_total")}
    assert ticks == {"0": 3.0, "1": 5.0}
    worlds = {(s.labels["worker"], s.labels["world_id"]) for s in families["worldsched_world_time_seconds"].samples}
    assert worlds == {("0", "1"), ("1", "2")}
    buckets = [s for s in families["worldsched_tick_lag_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"} and all("le" in s.labels for s in buckets)
    assert [s.labels for s in families["worldsched_worker_up"].samples] == [{"worker": "0"}]
    # One header per family, however many workers; no creation times.
    assert text.count("# TYPE worldsched_ticks_total counter") == 1
    assert text.count("# HELP worldsched_leases_held ") == 1
    assert "_created" not in text


def test_merged_exposition_renders_as_openmetrics_too() -> None:
    text = expose(_merged(), accept="application/openmetrics-text").body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert {s.labels["worker"] for s in families["worldsched_ticks"].samples} == {"0", "1"}
    assert families["worldsched_ticks"].type == "counter"


def test_an_answer_that_is_not_openmetrics_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_exposition(b"worldsched_ticks_total 1\n")  # Prometheus text: no # EOF


def test_world_ref_names_the_world_of_world_paths_only() -> None:
    assert world_ref("/api/v1/worlds/12/scheduler/pause") == 12
    assert world_ref("/api/v1/worlds/ext:harbor/npcs") == "harbor"
    assert world_ref("/api/v1/worlds/12") == 12
    assert world_ref("/api/v1/worlds") is None
    assert world_ref("/api/v1/worlds/") is None
    assert world_ref("/api/v1/worlds/0/scheduler/stats") is None  # invalid: any worker answers 422
    assert world_ref("/api/v1/generation/5/complete") is None
    assert world_ref("/metrics") is None


@pytest.mark.parametrize(
    "body",
    [
        # A space in a bucket's name: the parser reads it as a native histogram and trips (KeyError).
        b'# TYPE h histogram\nh x_bucket{le="1"} 0\n# EOF\n',
        b"\xff\n# EOF\n",
        b"<html>502 Bad Gateway</html>",
    ],
)
def test_any_garbage_is_refused_with_a_value_error(body: bytes) -> None:
    # The supervisor leaves out a worker whose answer raises ValueError; anything else fails the whole scrape.
    with pytest.raises(ValueError, match="not OpenMetrics"):
        parse_exposition(body)
