"""``WorldScheduler``: one tick of one world = load ─► decide (pure) ─► commit (see :mod:`.engine`)."""

from scheduler_daemon.scheduler.engine import (
    CommittedTick,
    TickListener,
    TickResult,
    WorldNotRegisteredError,
    WorldScheduler,
    _World,
)

__all__ = ["CommittedTick", "TickListener", "TickResult", "WorldNotRegisteredError", "WorldScheduler", "_World"]
