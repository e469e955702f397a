"""One exposition from several processes' (``run --workers``): every sample gains a ``worker`` label.

Every part is in the one format the scrape asked for: the supervisor hands
each worker the request's ``Accept`` (they negotiate as it does) and renders
its own series with the same encoder, so OpenMetrics stays OpenMetrics
(units, info and stateset types kept) and the Prometheus text format stays
text. Merging adds ``worker="<index>"`` to each sample and writes a family's
header lines (``# HELP``, ``# TYPE``, ``# UNIT``) once with every part's
samples after them, so the result is one valid exposition in which every
worker's series stays apart: the spread of ticks and decisions between
workers is visible, ``process_*`` stays per process, and ``sum without
(worker)`` gives the box's figures as ``sum without (instance)`` does for
daemons run by the systemd template.

It works on lines, not parsed families: prometheus_client's parser and
writer take some twenty times as long, which with per-world series on many
worlds is seconds of the supervisor's CPU per scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: The label naming the process a sample comes from.
WORKER_LABEL = "worker"
#: The line that ends an OpenMetrics exposition (each part's is dropped; the merge gets one).
EOF = "# EOF"
_HEADERS = ("# HELP ", "# TYPE ", "# UNIT ")


@dataclass
class _Family:
    #: ``HELP``/``TYPE``/``UNIT`` -> its line; the first part to give one wins.
    headers: dict[str, str] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)


def with_label(sample: str, name: str, value: str) -> str:
    """``sample`` (one exposition line) with ``name="value"`` as its first label."""
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    label = f'{name}="{_escape(value)}"'
    if sample[cut : cut + 1] == "{":
        rest = sample[cut + 1 :]
        return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:cut]}{{{label}}}{sample[cut:]}"


def merge_expositions(parts: Iterable[tuple[str | None, str]], *, openmetrics: bool) -> bytes:
    """Merge ``(worker, exposition)`` pairs of one format into one exposition, each sample labelled with its worker.

    A part whose worker is ``None`` is taken as it is (its samples carry their labels already).
    ``openmetrics``: the parts are OpenMetrics, and so the merge ends with ``# EOF``.
    """
    families: dict[str, _Family] = {}
    for worker, text in parts:
        current: _Family | None = None
        for line in text.splitlines():
            if line.startswith(_HEADERS):
                keyword, name = line[2:6], line.split(" ", 3)[2]
                current = families.setdefault(name, _Family())
                current.headers.setdefault(keyword, line)
            elif line and not line.startswith("#") and current is not None:
                current.samples.append(line if worker is None else with_label(line, WORKER_LABEL, worker))
    lines: list[str] = []
    for family in families.values():
        lines.extend(family.headers.values())
        lines.extend(family.samples)
    if openmetrics:
        lines.append(EOF)
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
