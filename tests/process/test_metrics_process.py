"""``/metrics`` of the real daemon: the format and encoding the scraper asks for, no ``_created`` series,
``[metrics] per_world`` obeyed by every series, and the dashboard and alerts checked against what it exposes."""

from __future__ import annotations

import contextlib
import gzip
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.process.test_daemon_world_time import _reset_pg, cli, poll
from tests.process.test_http_process import Daemon, base_env, start_daemon, stop
from tests.support.monitoring import check_against_scrape, monitoring_exprs, sample_kinds, selectors
from tests.system.test_monitoring import SUPERVISOR_METRICS

pytestmark = pytest.mark.subprocess

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@dataclass(frozen=True)
class Scraped:
    """One answer of ``/metrics``: its headers and its body as sent (not decoded)."""

    headers: httpx.Headers
    body: bytes


def fetch(url: str, **headers: str) -> Scraped:
    """``GET /metrics`` with exactly these negotiation headers (no gzip unless asked)."""
    headers = {"Accept-Encoding": "identity", **headers}
    with httpx.Client(timeout=10) as client, client.stream("GET", f"{url}/metrics", headers=headers) as answer:
        assert answer.status_code == 200
        return Scraped(answer.headers, b"".join(answer.iter_raw()))


def negotiated(url: str) -> list[Any]:
    """Check ``url``'s ``/metrics`` in each format and encoding; the Prometheus text format's families."""
    plain = fetch(url)
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "content-encoding" not in plain.headers and "Accept-Encoding" in plain.headers["vary"]
    families = list(text_string_to_metric_families(plain.body.decode()))
    assert "_created" not in plain.body.decode()

    om = fetch(url, Accept=f"{OPENMETRICS}, text/plain;q=0.5")
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    text = om.body.decode()
    assert text.endswith("# EOF\n") and "_created" not in text
    assert {f.name for f in openmetrics_families(text)} == {f.name for f in families}

    for accept in ("", OPENMETRICS):
        zipped = fetch(url, Accept=accept, **{"Accept-Encoding": "gzip, deflate"})
        assert zipped.headers["content-encoding"] == "gzip"
        body = gzip.decompress(zipped.body).decode()
        assert body.endswith("# EOF\n") if accept else "# EOF" not in body
        assert "worldsched_ticks_total" in body
    return families


def world_labelled(families: list[Any]) -> list[Any]:
    return [s for f in families for s in f.samples if "world_id" in s.labels]


def ticks(families: list[Any]) -> float:
    return sum(s.value for f in families if f.name == "worldsched_ticks" for s in f.samples)


@pytest.fixture
def seeded(db_url: str, tmp_path: Path) -> dict[str, str]:
    _reset_pg(db_url)
    env = base_env(db_url, tmp_path)
    assert cli("db", "upgrade", env=env).returncode == 0
    seeded = cli("demo", env=env)
    assert seeded.returncode == 0, seeded.stderr
    return env


@contextlib.contextmanager
def running(env: dict[str, str], tmp_path: Path) -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="sdm-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(short) / "notify.sock"))
        try:
            daemon = start_daemon(env, tmp_path, notify)
        finally:
            notify.close()
    try:
        yield daemon
    finally:
        assert stop(daemon) == 0, daemon.log.read_text()[-2000:]


def test_scrape_negotiates_format_and_gzip_and_satisfies_the_dashboard_and_alerts(
    seeded: dict[str, str], tmp_path: Path
) -> None:
    with running(seeded, tmp_path) as daemon:
        families = poll(
            lambda: (f := negotiated(daemon.url)) and ticks(f) >= 3 and world_labelled(f) and f,
            timeout=30,
            what="ticks and per-world series in the metrics",
        )
        # Every metric a panel or alert reads is exposed, with rate()/increase() on counters only and
        # deriv() on gauges only; the supervisor's own are checked on `run --workers` (test_workers.py).
        kinds = sample_kinds(families)
        problems = [
            f"{where}: {problem}"
            for where, expr in monitoring_exprs()
            for sel in selectors(expr)
            if sel.metric not in SUPERVISOR_METRICS
            for problem in check_against_scrape(sel, kinds)
        ]
        assert problems == []


def test_per_world_false_leaves_no_world_label_in_any_series(seeded: dict[str, str], tmp_path: Path) -> None:
    with running({**seeded, "SCHEDULER_METRICS__PER_WORLD": "false"}, tmp_path) as daemon:
        families = poll(lambda: (f := negotiated(daemon.url)) and ticks(f) >= 3 and f, timeout=30, what="ticks")
        assert world_labelled(families) == []
        text = gzip.decompress(fetch(daemon.url, Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"}).body).decode()
        assert "world_id" not in text
