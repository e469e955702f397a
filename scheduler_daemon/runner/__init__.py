"""The scheduler loop: ticks every registered world at its own rate (see :mod:`.loop`).

One concern per module: ``sync`` (asyncio primitives), ``state`` (limits,
slots, isolated worlds, commit health), ``ports`` (what the runner depends
on), ``registry``, ``discovery``, ``leasing``, ``dispatch``, ``batch``, and
``loop`` (the runner assembled from them).
"""

from scheduler_daemon.runner.loop import SchedulerLoopRunner
from scheduler_daemon.runner.ports import TickEngine, TickObserver, WorldSource
from scheduler_daemon.runner.state import BrokenWorld, RunnerLimits

__all__ = ["BrokenWorld", "RunnerLimits", "SchedulerLoopRunner", "TickEngine", "TickObserver", "WorldSource"]
