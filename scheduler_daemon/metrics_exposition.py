"""How ``/metrics`` answers: the format the scraper asks for, gzip when it accepts it, no ``_created`` series.

The format follows the request's ``Accept`` header as prometheus_client reads
it (:func:`~prometheus_client.exposition.choose_encoder`): OpenMetrics text
for ``application/openmetrics-text``, the Prometheus text format otherwise.
The body is gzipped when ``Accept-Encoding`` names gzip. An entry with
``q=0`` is one the client refuses (RFC 9110), so it is dropped before either
is read: prometheus_client's readers look at the media types and codings only.

``_created`` samples (a counter's or histogram's creation time) are left
out. prometheus_client's own switch for that (``disable_created_metrics()``,
or ``PROMETHEUS_DISABLE_CREATED_SERIES`` read at import) is one flag for the
whole process: it would also change the series of an application that runs
the scheduler in its own process and exports its own registry. The daemon's
registries are read through :class:`WithoutCreated` instead.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: The media type of an OpenMetrics answer (its ``Content-Type`` starts with it).
OPENMETRICS = "application/openmetrics-text"


@dataclass(frozen=True)
class Exposition:
    """A rendered ``/metrics`` answer."""

    body: bytes
    content_type: str
    #: ``gzip`` or ``None`` (the body as rendered).
    content_encoding: str | None = None

    def headers(self) -> dict[str, str]:
        """Response headers besides the length: the type, the encoding, and what the answer varies by."""
        headers = {"Content-Type": self.content_type, "Vary": "Accept, Accept-Encoding"}
        if self.content_encoding is not None:
            headers["Content-Encoding"] = self.content_encoding
        return headers


class WithoutCreated(Collector):
    """``collector``'s metrics without their ``_created`` samples."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        for metric in self._collector.collect():
            created = metric.name + "_created"
            if any(s.name == created for s in metric.samples):
                # A copy: a collector may hand out the same Metric on every scrape.
                kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                kept.samples = [s for s in metric.samples if s.name != created]
                metric = kept
            yield metric


class Snapshot(Collector):
    """Metrics collected once: rendering them may happen on another thread, the loop's state is not read again."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def expose(collector: Collector, *, accept: str = "", accept_encoding: str = "") -> Exposition:
    """``collector`` rendered in the format ``accept`` asks for, gzipped if ``accept_encoding`` allows."""
    encoder, content_type = negotiate(accept)
    return encoded(encoder(collector), content_type, accept_encoding)


def negotiate(accept: str) -> tuple[Callable[[Collector], bytes], str]:
    """The encoder of the format ``accept`` asks for, and the answer's content type."""
    try:
        return choose_encoder(_acceptable(accept))
    except TypeError:  # a version it cannot compare with 1.0.0 (``version=1.x``): the default, not a 500
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4


def encoded(body: bytes, content_type: str, accept_encoding: str) -> Exposition:
    """A rendered ``body`` as the answer, gzipped if ``accept_encoding`` allows."""
    if gzip_accepted(_acceptable(accept_encoding)):
        return Exposition(gzip.compress(body), content_type, "gzip")
    return Exposition(body, content_type)


def _acceptable(header: str) -> str:
    """``header`` (``Accept`` or ``Accept-Encoding``) without the entries it refuses (``q=0``)."""
    return ",".join(entry for entry in header.split(",") if not _refused(entry))


def _refused(entry: str) -> bool:
    for param in entry.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value) == 0
            except ValueError:
                return False
    return False
