"""``WorldScheduler``: registers worlds and ticks them against the store (see :mod:`.engine`).

``results`` holds what a tick returns and the per-world and per-tick records.
"""

from scheduler_daemon.scheduler.engine import WorldScheduler
from scheduler_daemon.scheduler.results import (
    CommittedTick,
    TickListener,
    TickResult,
    WorldNotRegisteredError,
    _World,
)

__all__ = ["CommittedTick", "TickListener", "TickResult", "WorldNotRegisteredError", "WorldScheduler", "_World"]
