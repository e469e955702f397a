"""Behaviour plug-in for the fault suite (``[scheduler] behavior = "tests.faults.plugins:decide"``).

It delegates to the built-in :func:`~scheduler_daemon.simulation.behavior.decide`
unless an NPC's *name* carries a fault marker. The test switches a fault on
and off by renaming NPCs in the database (a tick never writes ``name``, so a
tick in flight cannot undo the switch).

With ``$FAULT_PAUSE_FILE`` set, importing the module (the daemon does, to load
the behaviour) also arms a process pause on SIGUSR1: the daemon's event-loop
thread stops for ``$FAULT_PAUSE_SECONDS`` while ``WorldScheduler.tick_worlds``
plans the ``$FAULT_PAUSE_AT``-th world of a group, as a long garbage
collection or the OS descheduling the process would stop it (see
:func:`_arm_planning_pause`).

:func:`recording_sink` is the generation sink of the fault suite: it records
every hand-off so the audit can prove none was lost or made twice concurrently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from scheduler_daemon.generation import GenerationRequest
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


def _arm_planning_pause() -> None:
    """On SIGUSR1, pause the process once, inside the planning of the next group big enough.

    A profile hook (``sys.setprofile``, installed only while armed) watches
    calls: each call (start or resume) of ``WorldScheduler.tick_worlds``
    resets a count, each ``WorldSimulationContext.plan_advance`` adds one, and
    the ``$FAULT_PAUSE_AT``-th one (default 3) sleeps ``$FAULT_PAUSE_SECONDS``
    (default 0.3) in the event-loop thread before it runs, then disarms. The
    daemon's code runs unchanged; only the moment of the pause is chosen.
    Each pause appends ``<unix time> <seconds>`` to ``$FAULT_PAUSE_FILE``.
    """
    path = os.environ.get("FAULT_PAUSE_FILE")
    if not path:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # imported outside the daemon's loop (a CLI command): nothing to pause
    seconds = float(os.environ.get("FAULT_PAUSE_SECONDS", "0.3"))
    at = int(os.environ.get("FAULT_PAUSE_AT", "3"))
    planned = 0
    # WorldScheduler.tick_worlds lives in one module of the scheduler package.
    package = f"{os.sep}scheduler_daemon{os.sep}scheduler{os.sep}"

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal planned
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "tick_worlds" and package in code.co_filename:
            planned = 0
        elif code.co_name == "plan_advance" and code.co_filename.endswith("context.py"):
            planned += 1
            if planned == at:
                sys.setprofile(None)
                time.sleep(seconds)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{time.time():.6f} {seconds}\n".encode())
                finally:
                    os.close(fd)

    def arm() -> None:
        nonlocal planned
        planned = 0
        sys.setprofile(profile)  # a loop callback: the event-loop thread

    loop.add_signal_handler(signal.SIGUSR1, arm)


_arm_planning_pause()
