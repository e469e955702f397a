"""``WorldScheduler``: one tick of one world = load ─► decide (pure) ─► commit.

This package is the only place that combines the pure core (``context``,
``simulation/``) with the store. A tick's NPC updates and the new world time
commit in one transaction; the in-memory context changes only after the commit
succeeded, so a failed tick leaves database and context exactly as they were.
``WorldScheduler`` is assembled here from one class per concern.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler_daemon.generation import GenerationSink, leave_enqueued
from scheduler_daemon.scheduler.body import TickBody
from scheduler_daemon.scheduler.chains_generation import ChainsAndGeneration
from scheduler_daemon.scheduler.registry import WorldRegistry
from scheduler_daemon.scheduler.results import TickListener
from scheduler_daemon.scheduler.ticking import GroupTicking
from scheduler_daemon.scheduler.tiers import Tiering
from scheduler_daemon.simulation.behavior import DecideFn, decide
from scheduler_daemon.store.protocol import TickStore


class WorldScheduler(WorldRegistry, Tiering, GroupTicking, TickBody, ChainsAndGeneration):
    """Registers worlds and ticks them against a :class:`Store`.

    ``defaults`` is the raw camelCase simulation config used under each world's
    own (``[defaults.simulation]`` in the daemon's settings). ``decide_fn`` is
    the behaviour function (see :mod:`scheduler_daemon.simulation.behavior`).
    ``sink`` receives claimed generation requests after each tick's commit
    (see :mod:`scheduler_daemon.generation`); one grouped tick's hand-off stage
    takes at most ``sink_timeout_seconds``, the rest waits for the next tick.
    """

    def __init__(
        self,
        store: TickStore,
        *,
        defaults: Mapping[str, Any] | None = None,
        decide_fn: DecideFn = decide,
        sink: GenerationSink = leave_enqueued,
        sink_timeout_seconds: float = 5.0,
        on_commit: TickListener | None = None,
    ) -> None:
        self.store = store
        self.defaults = dict(defaults or {})
        self.decide_fn = decide_fn
        self.sink = sink
        self.sink_timeout_seconds = sink_timeout_seconds
        self.on_commit = on_commit
        self._worlds = {}
        self.registrations = 0
        self._ignored_sessions = {}
