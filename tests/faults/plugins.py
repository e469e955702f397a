"""Behaviour plug-in for the fault suite (``[scheduler] behavior = "tests.faults.plugins:decide"``).

It delegates to the built-in :func:`~scheduler_daemon.simulation.behavior.decide`
unless an NPC's *name* carries a fault marker. The test switches a fault on
and off by renaming NPCs in the database (a tick never writes ``name``, so a
tick in flight cannot undo the switch).
"""

from __future__ import annotations

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
