"""One Prometheus exposition from several processes' (``run --workers``): every sample gains a ``worker`` label.

Each worker renders its own registry (text format 0.0.4). Merging adds
``worker="<index>"`` to each sample and groups the samples of a family under
one ``# HELP``/``# TYPE`` header, so the result is one valid exposition in
which every worker's series stays apart: the spread of ticks and decisions
between workers is visible, ``process_*`` stays per process, and ``sum
without (worker)`` gives the box's figures as ``sum without (instance)`` does
for daemons run by the systemd template.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: The label naming the process a sample comes from.
WORKER_LABEL = "worker"


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)


def with_label(sample: str, name: str, value: str) -> str:
    """``sample`` (one exposition line) with ``name="value"`` as its first label."""
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    label = f'{name}="{_escape(value)}"'
    if sample[cut : cut + 1] == "{":
        rest = sample[cut + 1 :]
        return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:cut]}{{{label}}}{sample[cut:]}"


def merge_expositions(parts: Iterable[tuple[str | None, bytes]]) -> bytes:
    """Merge ``(worker, exposition)`` pairs into one exposition, each sample labelled with its worker.

    A part whose worker is ``None`` is taken as it is (its samples carry their labels already).
    """
    families: dict[str, _Family] = {}
    for worker, text in parts:
        current: _Family | None = None
        for line in text.decode("utf-8").splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                keyword, name = line[2:6], line.split(" ", 3)[2]
                current = families.setdefault(name, _Family())
                if keyword == "HELP" and current.help is None:
                    current.help = line
                elif keyword == "TYPE" and current.type is None:
                    current.type = line
            elif line and not line.startswith("#") and current is not None:
                current.samples.append(line if worker is None else with_label(line, WORKER_LABEL, worker))
    lines: list[str] = []
    for family in families.values():
        lines.extend(h for h in (family.help, family.type) if h is not None)
        lines.extend(family.samples)
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
