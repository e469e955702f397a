"""Checks for the Grafana dashboard and the Prometheus alert rules.

Every PromQL expression may only reference metrics the daemon exports (plus
the standard process_/python_ collectors and ``up``), so renaming a metric in
code without updating monitoring fails here. When ``promtool`` is installed
the rules are also validated and unit-tested against synthetic series. The
files are read by :mod:`tests.support.monitoring`, whose check against a
real scrape (types, not only names) the process tests run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from scheduler_daemon.metrics_exposition import WithoutCreated, expose
from tests.support.monitoring import (
    ALERTS,
    DASHBOARD,
    JOB,
    Selector,
    all_panels,
    check_against_scrape,
    dashboard_exprs,
    indent,
    parse_alert_blocks,
    sample_kinds,
    selectors,
)

# metric -> labels it carries (besides job/instance added by Prometheus).
GAUGES: dict[str, set[str]] = {
    "worldsched_worlds": {"state"},
    "worldsched_world_time_seconds": {"world_id"},
    "worldsched_npcs": {"tier"},
    "worldsched_npc_decision_lag_seconds": {"tier"},
    "worldsched_jobs": {"status"},
    "worldsched_config_last_reload_successful": set(),
    "worldsched_config_last_reload_success_timestamp_seconds": set(),
    "worldsched_build_info": {"version"},
    "worldsched_leases_held": set(),
    "worldsched_quarantined_rows": {"table"},
    "worldsched_http_connections": set(),
    "worldsched_change_listener_up": set(),
}
COUNTERS: dict[str, set[str]] = {
    "worldsched_ticks_total": {"outcome"},
    "worldsched_ticks_missed_total": set(),
    "worldsched_npc_ticks_total": {"tier"},
    "worldsched_jobs_enqueued_total": set(),
    "worldsched_chain_steps_total": set(),
    "worldsched_db_errors_total": set(),
    "worldsched_lease_lost_total": set(),
    "worldsched_lease_claims_total": set(),
    "worldsched_http_connections_closed_total": {"reason"},
    "worldsched_http_accept_errors_total": set(),
    "worldsched_change_notifications_total": set(),
    "worldsched_world_changes_applied_total": set(),
}
#: Exported by the supervisor of ``run --workers`` only (per worker: label ``worker``).
SUPERVISOR_METRICS: dict[str, set[str]] = {
    "worldsched_workers": set(),
    "worldsched_worker_up": set(),
    "worldsched_worker_restarts_total": set(),
}
OPTIONAL_COUNTERS: dict[str, set[str]] = {
    "worldsched_world_ticks_total": {"world_id"},
    "worldsched_world_npc_ticks_total": {"world_id", "tier"},
}
HISTOGRAMS = ["worldsched_tick_duration_seconds", "worldsched_tick_lag_seconds"]
LABEL_VALUES = {
    "state": {"running", "paused", "failing", "isolated"},
    "table": {"npcs", "sessions"},
    "outcome": {"ok", "error", "timeout"},
    "reason": {"timeout", "evicted", "refused"},
}


def _metric_labels() -> dict[str, set[str]]:
    known: dict[str, set[str]] = {**GAUGES, **COUNTERS, **OPTIONAL_COUNTERS, **SUPERVISOR_METRICS}
    for hist in HISTOGRAMS:
        known[f"{hist}_bucket"] = {"le"}
        known[f"{hist}_sum"] = set()
        known[f"{hist}_count"] = set()
    return known


KNOWN_METRICS = _metric_labels()
#: ``worker``: the process of ``run --workers`` a sample comes from (absent without it).
ALWAYS_ALLOWED_LABELS = {"job", "instance", "worker"}
EXTERNAL_PREFIXES = ("process_", "python_")


def check_selector(sel: Selector) -> list[str]:
    """Problems with one selector: unknown metric, label or label value."""
    if sel.metric == "up" or sel.metric.startswith(EXTERNAL_PREFIXES):
        return []
    if sel.metric not in KNOWN_METRICS:
        return [f"unknown metric {sel.metric!r}"]
    problems = []
    allowed = KNOWN_METRICS[sel.metric] | ALWAYS_ALLOWED_LABELS
    for label, op, value in sel.matchers:
        if label not in allowed:
            problems.append(f"{sel.metric} has no label {label!r}")
        elif op == "=" and label in LABEL_VALUES and value not in LABEL_VALUES[label]:
            problems.append(f"{sel.metric}: {label}={value!r} is not a known value")
    return problems


def test_scanner() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, instance) (rate(worldsched_tick_lag_seconds_bucket"
        '{job="scheduler-daemon", instance=~"$instance"}[$__rate_interval] offset 1h))) > 1 '
        'and on (instance) up{job="x"} == 0 or absent(up) unless time() - '
        "process_start_time_seconds < 5m"
    )
    got = [(s.metric, s.matchers) for s in selectors(expr)]
    assert got == [
        (
            "worldsched_tick_lag_seconds_bucket",
            [("job", "=", "scheduler-daemon"), ("instance", "=~", "$instance")],
        ),
        ("up", [("job", "=", "x")]),
        ("up", []),
        ("process_start_time_seconds", []),
    ]
    assert [s.function for s in selectors(expr)] == ["rate", None, "absent", None]
    assert [s.function for s in selectors("sum by (x) ((a > 0) * on (y) deriv(b[5m]))")] == ["sum", "deriv"]
    assert check_selector(Selector("worldsched_tick_total")) == ["unknown metric 'worldsched_tick_total'"]
    assert check_selector(Selector("worldsched_worlds", [("state", "=", "broken")])) == [
        "worldsched_worlds: state='broken' is not a known value"
    ]
    assert check_selector(Selector("worldsched_jobs", [("tier", "=", "hot")])) == [
        "worldsched_jobs has no label 'tier'"
    ]


def test_check_against_scrape_knows_counters_from_gauges() -> None:
    registry = CollectorRegistry()
    Counter("c", "A counter", registry=registry)
    Gauge("g", "A gauge", registry=registry)
    Histogram("h", "A histogram", registry=registry)
    kinds = sample_kinds(text_string_to_metric_families(expose(WithoutCreated(registry)).body.decode()))
    assert kinds == {
        "c_total": "counter",
        "g": "gauge",
        "h_bucket": "counter",
        "h_sum": "counter",
        "h_count": "counter",
    }
    problems = [p for e in ("rate(c_total[5m]) + deriv(g[5m])", "rate(h_bucket[1m])", "up") for p in check(e, kinds)]
    assert problems == []
    assert check("rate(g[5m])", kinds) == ["rate() on g, a gauge"]
    assert check("sum(increase(g[1h]))", kinds) == ["increase() on g, a gauge"]
    assert check("deriv(c_total[5m])", kinds) == ["deriv() on c_total, a counter"]
    assert check("max(c)", kinds) == ["c is not in a real scrape"]


def check(expr: str, kinds: Mapping[str, str]) -> list[str]:
    return [p for sel in selectors(expr) for p in check_against_scrape(sel, kinds)]


# --- dashboard ------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_dashboard_basics(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"]
    assert dashboard["uid"] == "scheduler-daemon"
    assert dashboard["id"] is None  # so import never overwrites another dashboard


def test_dashboard_has_datasource_input_and_variables(dashboard: dict[str, Any]) -> None:
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource"
    assert ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == "${DS_PROMETHEUS}"

    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["multi"] and instance["includeAll"]
    query = instance["query"]["query"] if isinstance(instance["query"], dict) else instance["query"]
    assert f'job="{JOB}"' in query
    assert query.startswith("label_values(") and query.rstrip().endswith(", instance)")


def test_every_panel_uses_the_templated_datasource(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panel_ids_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_ref_ids_unique_per_panel(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_dashboard_queries_reference_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    problems = []
    for title, expr in dashboard_exprs(dashboard):
        sels = selectors(expr)
        if not sels:
            problems.append(f"{title}: no metric in {expr!r}")
        for sel in sels:
            problems += [f"{title}: {p}" for p in check_selector(sel)]
            # Every query must be scoped to our job and the instance picker.
            if sel.matcher("job") != ("=", JOB) or sel.matcher("instance") != ("=~", "$instance"):
                problems.append(f"{title}: {sel.metric} not filtered by job and $instance")
    assert problems == []


def test_dashboard_covers_all_core_metrics(dashboard: dict[str, Any]) -> None:
    used = {sel.metric for _, expr in dashboard_exprs(dashboard) for sel in selectors(expr)}
    expected = set(GAUGES) | set(COUNTERS) | {f"{h}_bucket" for h in HISTOGRAMS}
    expected |= {"process_cpu_seconds_total", "process_resident_memory_bytes"}
    assert expected - used == set()


def test_histogram_panels_use_quantiles_over_bucket_rates(dashboard: dict[str, Any]) -> None:
    for hist in HISTOGRAMS:
        exprs = [e for _, e in dashboard_exprs(dashboard) if f"{hist}_bucket" in e]
        for quantile in ("0.5", "0.99"):
            assert any(e.startswith(f"histogram_quantile({quantile},") and "rate(" in e and "le" in e for e in exprs), (
                hist,
                quantile,
            )


# --- alert rules ------------------------------------------------------------

EXPECTED_ALERTS = {
    "SchedulerConfigReloadFailed",
    "SchedulerWorldsFailing",
    "SchedulerWorldsIsolated",
    "SchedulerRowsQuarantined",
    "SchedulerTickLagHigh",
    "SchedulerTicksMissed",
    "SchedulerJobBacklogGrowing",
    "SchedulerDown",
    "SchedulerDbErrors",
    "SchedulerLeaseLost",
    "SchedulerChangeListenerDown",
    "SchedulerHttpConnectionsShed",
    "SchedulerWorkerRestarting",
}


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    return parse_alert_blocks(ALERTS.read_text(encoding="utf-8"))


def test_alert_reader_on_sample() -> None:
    sample = (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n"
        "          up\n          == 0\n        for: 5m\n        labels:\n"
        "          severity: critical\n        annotations:\n          summary: s\n"
        "          description: >-\n            long\n            text\n"
        "      - alert: B\n        expr: up == 1\n"
    )
    assert parse_alert_blocks(sample) == [
        {
            "alert": "A",
            "expr": "up == 0",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {"summary": "s", "description": "long text"},
        },
        {"alert": "B", "expr": "up == 1", "labels": {}, "annotations": {}},
    ]


def test_expected_alerts_present(alert_rules: list[dict[str, Any]]) -> None:
    names = [r["alert"] for r in alert_rules]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS


def test_alerts_have_for_severity_and_annotations(alert_rules: list[dict[str, Any]]) -> None:
    for rule in alert_rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: missing for:"
        assert rule["labels"].get("severity") in {"critical", "warning"}, name
        assert rule["annotations"].get("summary"), name
        assert rule["annotations"].get("description"), name


def test_alert_exprs_reference_only_exported_metrics(alert_rules: list[dict[str, Any]]) -> None:
    problems = []
    for rule in alert_rules:
        sels = selectors(rule["expr"])
        if not sels:
            problems.append(f"{rule['alert']}: no metric")
        for sel in sels:
            problems += [f"{rule['alert']}: {p}" for p in check_selector(sel)]
            if sel.matcher("job") != ("=", JOB):
                problems.append(f"{rule['alert']}: {sel.metric} not filtered by job")
    assert problems == []


def test_specific_alert_semantics(alert_rules: list[dict[str, Any]]) -> None:
    by_name = {r["alert"]: r for r in alert_rules}
    down = by_name["SchedulerDown"]["expr"]
    assert f'up{{job="{JOB}"}} == 0' in down and f'absent(up{{job="{JOB}"}})' in down
    lag = by_name["SchedulerTickLagHigh"]["expr"]
    assert lag.startswith("histogram_quantile(0.99,") and lag.endswith("> 1")
    assert "worldsched_tick_lag_seconds_bucket" in lag


def test_alerts_match_pyyaml_if_available(alert_rules: list[dict[str, Any]]) -> None:
    """Cross-check the line reader against a real YAML parser when one exists."""
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (not a project dependency)")
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    parsed = [r for g in doc["groups"] for r in g["rules"]]
    assert [r["alert"] for r in parsed] == [r["alert"] for r in alert_rules]
    for real, ours in zip(parsed, alert_rules, strict=True):
        assert real["for"] == ours["for"]
        assert real["labels"] == ours["labels"]
        assert " ".join(real["expr"].split()) == " ".join(ours["expr"].split())


# --- promtool -------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)",
)


@needs_promtool
def test_promtool_check_rules() -> None:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in proc.stdout


def rules_without_annotations(text: str) -> str:
    """Drop ``annotations:`` maps: promtool's unit tests compare rendered
    annotations verbatim, which would pin every description's wording. Their
    templates are still validated by ``promtool check rules``."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        if skip_deeper_than is not None:
            if not line.strip() or indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent(line)
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def _alert(name: str, severity: str = "warning", **labels: str) -> dict[str, Any]:
    return {"exp_labels": {"severity": severity, "job": JOB, **labels}}


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"job": JOB, "instance": "a:9100", **labels}
    rendered = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{metric}{{{rendered}}}", "values": values}


def _bucket_series(metric: str, per_min: dict[str, int]) -> list[dict[str, str]]:
    """Histogram buckets whose counters grow by ``per_min[le]`` each minute."""
    return [_series(f"{metric}_bucket", f"0+{inc}x40", le=le) for le, inc in per_min.items()]


INSTANCE = {"instance": "a:9100"}


def rule_tests() -> list[dict[str, Any]]:
    """Scenarios: each alert fires when it should and stays quiet otherwise."""
    slow = {"0.1": 0, "0.5": 0, "1": 0, "2.5": 60, "+Inf": 60}
    fast = {"0.1": 60, "0.5": 60, "1": 60, "2.5": 60, "+Inf": 60}
    return [
        {  # up == 0 for longer than 2m
            "interval": "1m",
            "input_series": [_series("up", "1 0 0 0 0 0")],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "SchedulerDown", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "SchedulerDown",
                    "exp_alerts": [_alert("SchedulerDown", "critical", **INSTANCE)],
                },
            ],
        },
        {  # target missing entirely
            "interval": "1m",
            "input_series": [],
            "alert_rule_test": [
                {
                    "eval_time": "3m",
                    "alertname": "SchedulerDown",
                    "exp_alerts": [_alert("SchedulerDown", "critical")],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                _series("up", "1x40"),
                _series("worldsched_config_last_reload_successful", "1 1 0 0 0 0 0"),
                _series("worldsched_worlds", "2x40", state="failing"),
                _series("worldsched_worlds", "0 0 1x40", state="isolated"),
                _series("worldsched_worlds", "9x40", state="running"),
                _series("worldsched_quarantined_rows", "0 3x40", table="npcs"),
                *_bucket_series("worldsched_tick_lag_seconds", slow),
                _series("worldsched_ticks_missed_total", "0+3x40"),
                _series("worldsched_jobs", "10+5x60", status="pending"),
                _series("worldsched_db_errors_total", "0+1x40"),
                _series("worldsched_lease_lost_total", "0 0 0 1 1 1 1 1 1"),
                _series("worldsched_change_listener_up", "1 1 0x40"),
                _series("worldsched_http_connections_closed_total", "0+600x40", reason="evicted"),
                _series("worldsched_worker_restarts_total", "0+1x40", worker="1"),
                _series("worldsched_worker_restarts_total", "0x40", worker="0"),
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "SchedulerConfigReloadFailed", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "SchedulerConfigReloadFailed",
                    "exp_alerts": [_alert("SchedulerConfigReloadFailed", **INSTANCE)],
                },
                {"eval_time": "3m", "alertname": "SchedulerWorldsFailing", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "SchedulerWorldsFailing",
                    "exp_alerts": [_alert("SchedulerWorldsFailing", **INSTANCE)],
                },
                {"eval_time": "4m", "alertname": "SchedulerWorldsIsolated", "exp_alerts": []},
                {
                    "eval_time": "9m",
                    "alertname": "SchedulerWorldsIsolated",
                    "exp_alerts": [_alert("SchedulerWorldsIsolated", **INSTANCE)],
                },
                {"eval_time": "10m", "alertname": "SchedulerRowsQuarantined", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerRowsQuarantined",
                    "exp_alerts": [_alert("SchedulerRowsQuarantined", table="npcs", **INSTANCE)],
                },
                {"eval_time": "8m", "alertname": "SchedulerTickLagHigh", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerTickLagHigh",
                    "exp_alerts": [_alert("SchedulerTickLagHigh", **INSTANCE)],
                },
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerTicksMissed",
                    "exp_alerts": [_alert("SchedulerTicksMissed", **INSTANCE)],
                },
                {"eval_time": "10m", "alertname": "SchedulerJobBacklogGrowing", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerJobBacklogGrowing",
                    "exp_alerts": [_alert("SchedulerJobBacklogGrowing", status="pending", **INSTANCE)],
                },
                {
                    "eval_time": "25m",
                    "alertname": "SchedulerDbErrors",
                    "exp_alerts": [_alert("SchedulerDbErrors", **INSTANCE)],
                },
                {"eval_time": "5m", "alertname": "SchedulerHttpConnectionsShed", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerHttpConnectionsShed",
                    "exp_alerts": [_alert("SchedulerHttpConnectionsShed", **INSTANCE)],
                },
                {"eval_time": "3m", "alertname": "SchedulerWorkerRestarting", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SchedulerWorkerRestarting",
                    "exp_alerts": [_alert("SchedulerWorkerRestarting", worker="1", **INSTANCE)],
                },
                {"eval_time": "2m", "alertname": "SchedulerLeaseLost", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "SchedulerLeaseLost",
                    "exp_alerts": [_alert("SchedulerLeaseLost", **INSTANCE)],
                },
                {"eval_time": "5m", "alertname": "SchedulerChangeListenerDown", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "SchedulerChangeListenerDown",
                    "exp_alerts": [_alert("SchedulerChangeListenerDown", **INSTANCE)],
                },
            ],
        },
        {  # healthy daemon with one-off blips: nothing fires
            "interval": "1m",
            "input_series": [
                _series("up", "1x40"),
                _series("worldsched_config_last_reload_successful", "1x40"),
                _series("worldsched_worlds", "0x40", state="failing"),
                _series("worldsched_worlds", "0 1 0x38", state="isolated"),
                _series("worldsched_quarantined_rows", "0 2 0x38", table="npcs"),
                *_bucket_series("worldsched_tick_lag_seconds", fast),
                _series("worldsched_ticks_missed_total", "0 0 0 1 1x36"),
                _series("worldsched_jobs", "50x60", status="pending"),
                _series("worldsched_db_errors_total", "0 0 2 2x37"),
                _series("worldsched_lease_lost_total", "0x40"),
                _series("worldsched_change_listener_up", "1 1 0 0 1x36"),
                _series("worldsched_http_connections_closed_total", "0+2x40", reason="timeout"),
                _series("worldsched_http_connections_closed_total", "0x40", reason="evicted"),
                _series("worldsched_http_accept_errors_total", "0x40"),
                _series("worldsched_worker_restarts_total", "0 0 1 1x37", worker="0"),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": name, "exp_alerts": []} for name in sorted(EXPECTED_ALERTS)
            ],
        },
    ]


@needs_promtool
def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules_without_annotations(ALERTS.read_text(encoding="utf-8")))
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": rule_tests()}
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps(spec, indent=2))  # JSON is valid YAML
    proc = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_without_annotations_strips_only_annotations() -> None:
    stripped = rules_without_annotations(ALERTS.read_text(encoding="utf-8"))
    assert "annotations:" not in stripped and "summary:" not in stripped
    assert stripped.count("- alert:") == len(EXPECTED_ALERTS)
    assert stripped.count("severity:") == len(EXPECTED_ALERTS)
    assert stripped.count("expr:") == len(EXPECTED_ALERTS)
