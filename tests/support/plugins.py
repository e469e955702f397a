"""Behaviour plug-ins for subprocess tests (``[scheduler] behavior = "tests.support.plugins:…"``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scheduler_daemon.simulation.behavior import BehaviorContent, decide
from scheduler_daemon.simulation.npc import NpcDecision, NpcState

#: Environment variable naming the marker file that wedges the daemon.
BLOCK_MARKER_ENV = "TEST_BLOCK_MARKER"


def blocking_decide(npc: NpcState, content: BehaviorContent, world_time: float, tier_interval: float) -> NpcDecision:
    """The default behaviour, except that it blocks the event loop while the marker file exists.

    A real wedge: ``time.sleep`` in the loop's thread stops every coroutine,
    the scheduler loop and the watchdog feeder included. ``<marker>.blocked``
    tells the test the wedge has begun.
    """
    marker = os.environ.get(BLOCK_MARKER_ENV)
    if marker and Path(marker).exists():
        blocked = Path(marker + ".blocked")
        blocked.touch()
        while Path(marker).exists():
            time.sleep(0.02)
        blocked.unlink()
    return decide(npc, content, world_time, tier_interval)
