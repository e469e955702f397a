"""Shared measurement helpers: percentiles, CPU and memory readings, progress output."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    """Current resident set size in MiB (from /proc, Linux)."""
    with open("/proc/self/statm") as fh:  # noqa: PTH123 - hot enough to avoid pathlib
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / (1024 * 1024)


def brk_heap_mib() -> float:
    """Resident MiB of the process's brk heap (``[heap]`` in smaps): glibc's main arena.

    Set against :func:`rss_mib` it tells allocator fragmentation (the heap
    grows) from mmapped memory (Python's arenas, large buffers).
    """
    with open("/proc/self/smaps") as fh:  # noqa: PTH123 - as rss_mib
        in_heap = False
        for line in fh:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Rss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def progress(message: str) -> None:
    """One progress line on stderr (stdout may carry JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lag_summary(lags_seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/max of lags, in milliseconds."""
    return {
        "p50_lag_ms": percentile(lags_seconds, 50) * 1000.0,
        "p99_lag_ms": percentile(lags_seconds, 99) * 1000.0,
        "max_lag_ms": (max(lags_seconds) if lags_seconds else 0.0) * 1000.0,
    }
