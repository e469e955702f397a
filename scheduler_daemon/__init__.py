"""World Simulation Scheduler daemon.

Public Python API for embedding::

    from scheduler_daemon import Store, WorldScheduler, SchedulerLoopRunner

    store = Store.from_url("sqlite+aiosqlite:///worlds.db")
    scheduler = WorldScheduler(store)
    await scheduler.register_world(1)
    await scheduler.tick_world(1, delta_real_seconds=1.0)

Generation requests: :mod:`scheduler_daemon.generation`; interaction chains and
cooldowns: :mod:`scheduler_daemon.chains`.
"""

from scheduler_daemon.clock import Clock, MonotonicClock, VirtualClock
from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.runner import SchedulerLoopRunner
from scheduler_daemon.scheduler import TickResult, WorldScheduler
from scheduler_daemon.store.repository import Store
from scheduler_daemon.world_config import WorldConfig

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "MonotonicClock",
    "SchedulerLoopRunner",
    "Store",
    "TickResult",
    "VirtualClock",
    "WorldConfig",
    "WorldScheduler",
    "WorldSimulationContext",
    "__version__",
]
