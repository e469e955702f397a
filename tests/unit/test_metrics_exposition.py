"""How ``/metrics`` negotiates: ``Accept`` and ``Accept-Encoding`` read as HTTP means them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from scheduler_daemon.metrics_exposition import expose

PLAIN = "text/plain; version=0.0.4; charset=utf-8"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("worldsched_ticks", "Ticks", registry=registry).inc()
    return registry


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", PLAIN),
        ("*/*", PLAIN),
        ("application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3,*/*;q=0.2", "application/"),
        # q=0: "not acceptable" (RFC 9110 12.4.2), whatever its place in the list.
        ("application/openmetrics-text; version=1.0.0; q=0, text/plain", PLAIN),
        ("application/openmetrics-text;q=0.0", PLAIN),
        # A version prometheus_client cannot compare: the default format, not a 500.
        ("application/openmetrics-text; version=1.x", PLAIN),
    ],
)
def test_format_follows_accept(accept: str, content_type: str) -> None:
    assert expose(_registry(), accept=accept).content_type.startswith(content_type)


@pytest.mark.parametrize(
    ("accept_encoding", "encoding"),
    [
        ("", None),
        ("gzip", "gzip"),
        ("deflate, GZIP;q=0.5", "gzip"),
        ("gzip;q=0", None),
        ("gzip; q=0.000, identity", None),
        ("identity", None),
    ],
)
def test_gzip_only_when_accepted(accept_encoding: str, encoding: str | None) -> None:
    assert expose(_registry(), accept_encoding=accept_encoding).content_encoding == encoding
