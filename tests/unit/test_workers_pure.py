"""The pure parts of ``run --workers``: merging expositions with a ``worker`` label, and which world a path names."""

from __future__ import annotations

import gzip

import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon.http.proxy import Fetched, merged_exposition, world_ref
from scheduler_daemon.metrics_exposition import WithoutCreated, expose
from scheduler_daemon.metrics_merge import with_label

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _worker(ticks: int, world: str, accept: str) -> Fetched:
    """A worker's answer to the supervisor, which forwards the scrape's ``Accept``."""
    r = CollectorRegistry()
    Counter("worldsched_ticks", "Ticks", ["outcome"], registry=r).labels("ok").inc(ticks)
    Counter("worldsched_busy", "Busy time", unit="seconds", registry=r).inc(2)
    Gauge("worldsched_leases_held", "Leases", registry=r).set(ticks)
    Gauge("worldsched_world_time_seconds", "Time", ["world_id"], registry=r).labels(world).set(1.5)
    Histogram("worldsched_tick_lag_seconds", "Lag", buckets=(0.1, 1.0), registry=r).observe(0.05)
    Enum("worldsched_mode", "Mode", states=["a", "b"], registry=r)
    answer = expose(WithoutCreated(r), accept=accept)
    return Fetched(200, answer.content_type.encode(), answer.body)


def _merged(accept: str, *extra: tuple[str, Fetched], accept_encoding: str = "") -> str:
    own = CollectorRegistry()
    Gauge("worldsched_worker_up", "Up", ["worker"], registry=own).labels("0").set(1)
    process = CollectorRegistry()
    Gauge("process_open_fds", "Fds", registry=process).set(7)
    answers = [("0", _worker(3, "1", accept)), ("1", _worker(5, 'x"y\\z\n', accept)), *extra]
    exposition = merged_exposition(answers, (WithoutCreated(own), WithoutCreated(process)), accept, accept_encoding)
    body = gzip.decompress(exposition.body) if exposition.content_encoding else exposition.body
    return body.decode()


def test_merged_exposition_is_one_valid_exposition_with_every_sample_labelled() -> None:
    text = _merged("")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ticks = {s.labels["worker"]: s.value for s in families["worldsched_ticks"].samples if s.name.endswith("_total")}
    assert ticks == {"0": 3.0, "1": 5.0}
    worlds = {(s.labels["worker"], s.labels["world_id"]) for s in families["worldsched_world_time_seconds"].samples}
    assert worlds == {("0", "1"), ("1", 'x"y\\z\n')}
    buckets = [s for s in families["worldsched_tick_lag_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"} and all("le" in s.labels for s in buckets)
    assert [s.labels for s in families["worldsched_worker_up"].samples] == [{"worker": "0"}]
    assert [s.labels for s in families["process_open_fds"].samples] == [{"worker": "supervisor"}]
    # One header per family, however many workers; no creation times.
    assert text.count("# TYPE worldsched_ticks_total counter") == 1
    assert text.count("# HELP worldsched_leases_held ") == 1
    assert "_created" not in text and "# EOF" not in text


def test_merged_exposition_is_openmetrics_when_asked_with_types_and_units_kept() -> None:
    accept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.3"
    text = _merged(accept, accept_encoding="gzip")
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    families = {f.name: f for f in openmetrics_families(text)}
    assert {s.labels["worker"] for s in families["worldsched_ticks"].samples} == {"0", "1"}
    assert families["worldsched_ticks"].type == "counter"
    busy = families["worldsched_busy_seconds"]
    assert (busy.type, busy.unit) == ("counter", "seconds")
    assert families["worldsched_mode"].type == "stateset"
    assert text.count("# UNIT worldsched_busy_seconds seconds") == 1


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_a_worker_answer_that_is_not_the_format_asked_for_is_left_out(accept: str) -> None:
    whole = _worker(9, "3", accept)
    other = _worker(9, "3", OPENMETRICS if not accept else "")
    garbage = [
        ("2", Fetched(200, whole.content_type, whole.body[: whole.body.index(b"\n", 100) + 5])),  # cut short
        ("3", Fetched(200, other.content_type, other.body)),  # the other format
        ("4", Fetched(200, whole.content_type, b"\xff" + whole.body)),  # not UTF-8
    ]
    parse = openmetrics_families if accept else text_string_to_metric_families
    families = {f.name: f for f in parse(_merged(accept, *garbage))}
    assert {s.labels["worker"] for s in families["worldsched_ticks"].samples} == {"0", "1"}


def test_with_label_handles_no_labels_empty_braces_and_escaping() -> None:
    assert with_label("up 1", "worker", "0") == 'up{worker="0"} 1'
    assert with_label('a{b="c"} 2', "worker", "1") == 'a{worker="1",b="c"} 2'
    assert with_label("a{} 2", "worker", "1") == 'a{worker="1"} 2'
    assert with_label("a 2", "worker", 'x"y') == 'a{worker="x\\"y"} 2'
    assert with_label('a_total{b="c"} 2 # {trace_id="t"} 1.0', "worker", "1") == (
        'a_total{worker="1",b="c"} 2 # {trace_id="t"} 1.0'
    )


def test_world_ref_names_the_world_of_world_paths_only() -> None:
    assert world_ref("/api/v1/worlds/12/scheduler/pause") == 12
    assert world_ref("/api/v1/worlds/ext:harbor/npcs") == "harbor"
    assert world_ref("/api/v1/worlds/12") == 12
    assert world_ref("/api/v1/worlds") is None
    assert world_ref("/api/v1/worlds/") is None
    assert world_ref("/api/v1/worlds/0/scheduler/stats") is None  # invalid: any worker answers 422
    assert world_ref("/api/v1/generation/5/complete") is None
    assert world_ref("/metrics") is None
