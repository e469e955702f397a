"""Reading the monitoring files: a small PromQL scanner, the dashboard's queries, the alert rules, and the
check of every query against a real scrape (metric exposed, rate() on counters only, deriv() on gauges only).

Used by tests/system/test_monitoring.py (the files on their own) and by the process tests that scrape a
real daemon or ``run --workers`` box.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
JOB = "scheduler-daemon"


# --- a small PromQL scanner ------------------------------------------------

KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_STRING = r'"(?:\\.|[^"\\])*"'
_BRACES = r'\{(?:[^}"]|' + _STRING + r")*\}"
_TOKEN = re.compile(
    r"(?P<num>\d[\w.]*)"
    rf"|(?P<str>{_STRING})"
    rf"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?P<sel>{_BRACES})?"
    rf"|(?P<braces>{_BRACES})"
    r"|(?P<open>\()|(?P<close>\))"
)
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(" + _STRING + ")")


@dataclass
class Selector:
    """One metric reference in an expression, with its label matchers and the function applied to it."""

    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)
    #: The innermost function or aggregation the selector is an argument of (``rate``, ``sum``), if any.
    function: str | None = None

    def matcher(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


def selectors(expr: str) -> list[Selector]:
    """Return the metric selectors used in a PromQL expression.

    Function and aggregation names (followed by ``(``), grouping clauses,
    range durations, numbers, strings and keywords are not metrics.
    """
    s = re.sub(r"\[[^\]]*\]", "", expr)  # range vectors / subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    found: list[Selector] = []
    calls: list[str | None] = []  # per open parenthesis: the function it belongs to (None: grouping)
    called: str | None = None
    for m in _TOKEN.finditer(s):
        if m.group("open"):
            calls.append(called)
            called = None
            continue
        if m.group("close"):
            calls.pop()
            continue
        ident = m.group("ident")
        if ident is None or ident.lower() in KEYWORDS:
            continue
        if m.group("sel") is None and s[m.end() :].lstrip().startswith("("):
            called = ident  # function call or aggregation
            continue
        matchers = [
            (name, op, json.loads(value)) for name, op, value in _MATCHER.findall((m.group("sel") or "{}")[1:-1])
        ]
        function = next((c for c in reversed(calls) if c is not None), None)
        found.append(Selector(ident, matchers, function))
    assert not calls, f"unbalanced parentheses in {expr!r}"
    return found


#: Range functions meant for counters (a drop is a restart), and for gauges (the slope of a level).
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
GAUGE_FUNCTIONS = {"deriv", "delta", "idelta", "predict_linear"}
#: The sample names of a family of each type, by suffix, and whether they count (only ever grow) or not.
_SUFFIXES: dict[str, dict[str, str]] = {
    "counter": {"_total": "counter"},
    "histogram": {"_bucket": "counter", "_sum": "counter", "_count": "counter"},
    "summary": {"": "gauge", "_sum": "counter", "_count": "counter"},
    "info": {"_info": "gauge"},
}


def sample_kinds(families: Iterable[Metric]) -> dict[str, str]:
    """Every sample name a scrape's families define (with samples or not): ``counter`` or ``gauge``."""
    return {
        family.name + suffix: kind
        for family in families
        for suffix, kind in _SUFFIXES.get(family.type, {"": "gauge"}).items()
    }


def check_against_scrape(sel: Selector, kinds: Mapping[str, str]) -> list[str]:
    """Problems of one selector against a real scrape: not exposed, or a function meant for another type."""
    if sel.metric == "up":  # Prometheus's own, per target
        return []
    kind = kinds.get(sel.metric)
    if kind is None:
        return [f"{sel.metric} is not in a real scrape"]
    if (sel.function in COUNTER_FUNCTIONS and kind != "counter") or (
        sel.function in GAUGE_FUNCTIONS and kind != "gauge"
    ):
        return [f"{sel.function}() on {sel.metric}, a {kind}"]
    return []


def monitoring_exprs() -> list[tuple[str, str]]:
    """``(panel title or alert name, PromQL)`` of every dashboard query and alert rule."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = parse_alert_blocks(ALERTS.read_text(encoding="utf-8"))
    return dashboard_exprs(dashboard) + [(rule["alert"], rule["expr"]) for rule in rules]


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels plus those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in all_panels(dashboard) for target in panel.get("targets", [])]


def indent(line: str) -> int:
    """Leading spaces of a line."""
    return len(line) - len(line.lstrip(" "))


def parse_alert_blocks(text: str) -> list[dict[str, Any]]:
    """Minimal reader for the rule layout used in alerts.yml.

    PyYAML is not a project dependency, so the structure is read line by line:
    each ``- alert:`` item's scalar keys, its ``labels``/``annotations`` maps
    and a (possibly block-scalar) ``expr``. Anything it cannot place fails the
    test rather than being skipped.
    """
    rules: list[dict[str, Any]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)- alert:\s*(\S+)\s*$", line)
        if not m:
            i += 1
            continue
        key_indent = len(m.group(1)) + 2
        rule: dict[str, Any] = {"alert": m.group(2), "labels": {}, "annotations": {}}
        i += 1
        current_map: str | None = None
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            ind = indent(line)
            if ind < key_indent:
                break
            key, _, value = line.strip().partition(":")
            value = value.strip()
            if ind == key_indent:
                current_map = key if key in ("labels", "annotations") else None
                if value in ("|", ">-", ">", "|-"):
                    block = []
                    i += 1
                    while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > key_indent):
                        block.append(lines[i].strip())
                        i += 1
                    rule[key] = " ".join(b for b in block if b)
                    continue
                if current_map is None:
                    rule[key] = value
            else:
                assert current_map is not None, f"unexpected nesting: {line!r}"
                if value in ("|", ">-", ">", "|-"):
                    block = []
                    i += 1
                    while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > ind):
                        block.append(lines[i].strip())
                        i += 1
                    rule[current_map][key] = " ".join(b for b in block if b)
                    continue
                rule[current_map][key] = value.strip('"')
            i += 1
        rules.append(rule)
    return rules
