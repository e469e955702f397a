"""Behaviour plug-in for the fault suite (``[scheduler] behavior = "tests.faults.plugins:decide"``).

It delegates to the built-in :func:`~scheduler_daemon.simulation.behavior.decide`
unless an NPC's *name* carries a fault marker. The test switches a fault on
and off by renaming NPCs in the database (a tick never writes ``name``, so a
tick in flight cannot undo the switch).

:func:`recording_sink` is the generation sink of the fault suite: it records
every hand-off so the audit can prove none was lost or made twice concurrently.
"""

from __future__ import annotations

import os
import time

from scheduler_daemon.jobs import GenerationRequest
from scheduler_daemon.simulation.behavior import BehaviorContent
from scheduler_daemon.simulation.behavior import decide as builtin_decide
from scheduler_daemon.simulation.npc import NpcDecision, NpcState

#: NPCs whose name starts with this make the behaviour raise.
RAISE_MARKER = "raise:"


class InjectedBehaviourError(RuntimeError):
    """Raised by the plug-in for NPCs marked with :data:`RAISE_MARKER`."""


def decide(npc: NpcState, content: BehaviorContent, world_time: float, tier_interval: float) -> NpcDecision:
    """The built-in decision, or an exception for marked NPCs."""
    if npc.name.startswith(RAISE_MARKER):
        raise InjectedBehaviourError(f"injected behaviour fault: npc {npc.id} of world {npc.world_id}")
    return builtin_decide(npc, content, world_time, tier_interval)


def recording_sink(request: GenerationRequest) -> None:
    """Accept, appending ``<id> <pid> <unix time>`` to ``$FAULT_SINK_FILE``.

    One ``O_APPEND`` write per hand-off: the line is in the file even if the
    daemon is SIGKILLed right after (before it records the hand-off).
    """
    line = f"{request.id} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(os.environ["FAULT_SINK_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
