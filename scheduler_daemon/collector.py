"""The garbage collector of the daemon: startup frozen out of its way, young objects collected less often."""

from __future__ import annotations

import gc
from typing import Final

#: Allocations between young-generation collections (CPython's default is 700).
#: A tick allocates a few objects per NPC decided; at the default, collections
#: cost ~8 % of a flat-out tick's CPU (docs/performance.md). Bounded: at most
#: this many young container objects wait for the collector.
YOUNG_THRESHOLD: Final = 50_000


def settle() -> None:
    """Once ready: freeze what startup built (it lives as long as the process); collect young objects less often.

    Frozen objects are never scanned again, so full collections stop stalling
    due ticks; older generations keep CPython's default ratios.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
