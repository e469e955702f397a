"""One set of metric families from several processes' (``run --workers``): every sample gains a ``worker`` label.

Each worker's ``/metrics`` is read back into metric families (it is asked
for OpenMetrics, which keeps what the Prometheus text format munges: units,
info and stateset types). Merging adds ``worker="<index>"`` to each sample
and groups the samples of a family under one family, so the result renders
as one valid exposition in either format
(:mod:`scheduler_daemon.metrics_exposition`) in which every worker's series
stays apart: the spread of ticks and decisions between workers is visible,
``process_*`` stays per process, and ``sum without (worker)`` gives the
box's figures as ``sum without (instance)`` does for daemons run by the
systemd template.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: The label naming the process a sample comes from.
WORKER_LABEL = "worker"


def parse_exposition(body: bytes) -> list[Metric]:
    """A worker's OpenMetrics answer as metric families; raises ``ValueError`` if it is not one."""
    try:
        families = text_string_to_metric_families(body.decode("utf-8"))  # type: ignore[no-untyped-call]  # unannotated
        return list(families)
    except Exception as exc:  # the parser trips over some garbage with KeyError or IndexError, not ValueError
        raise ValueError(f"not OpenMetrics: {type(exc).__name__}: {exc}") from exc


class MergedMetrics(Collector):
    """``(worker, families)`` pairs as one collector, each sample labelled with its worker.

    A part whose worker is ``None`` is taken as it is (its samples carry their labels already).
    The first part to name a family gives its help and type.
    """

    def __init__(self, parts: Iterable[tuple[str | None, Iterable[Metric]]]) -> None:
        self._families: dict[str, Metric] = {}
        for worker, families in parts:
            for family in families:
                merged = self._families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    self._families[family.name] = merged
                if worker is None:
                    merged.samples.extend(family.samples)
                else:
                    merged.samples.extend(s._replace(labels={WORKER_LABEL: worker, **s.labels}) for s in family.samples)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families.values())
