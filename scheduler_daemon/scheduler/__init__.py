"""``WorldScheduler``: registers worlds and ticks them against the store (see :mod:`.engine`).

One concern per module: ``results`` (what a tick returns, per-world and
per-tick records), ``base`` (the shared state), ``registry``, ``tiers``,
``ticking`` (a group of worlds in one commit), ``body`` (one world's tick),
``chains_generation`` (chain steps, generation hand-off), and ``engine``
(the scheduler assembled from them).
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
