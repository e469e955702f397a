"""What the grouped NPC write sends of each decision: its columns packed, and its state only when it changed.

Pure encoding, no I/O (:meth:`~scheduler_daemon.store.ticks.Ticks.write_decisions_many`
runs the statement). A decision that cannot be written (a plug-in's NaN, a
lone surrogate, a state JSON cannot hold) fails its world with an error that
names the NPC and the column.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence
from typing import Any, Final

from scheduler_daemon.simulation.npc import NpcDecision, NpcState
from scheduler_daemon.store import state_json
from scheduler_daemon.store.pg_arrays import PackedArray, float8_array, int4_array, jsonb_document, text_array

_DECISION_NUMBERS: Final = (
    "next_decision_at",
    "activity_started_at",
    "energy",
    "mood_valence",
    "mood_arousal",
    "decided_at",
)


def _non_finite(decisions: Sequence[NpcDecision]) -> str:
    """Which decision holds a non-finite number, for the error that fails its world's tick."""
    for d in decisions:
        for name in _DECISION_NUMBERS:
            value = getattr(d, name)
            if value is not None and not math.isfinite(value):
                return f"npc {d.npc_id}: decision {name} is not a finite number ({value!r})"
    return "a decision holds a number that is not finite"


def _same_json(a: Any, b: Any) -> bool:
    """``a == b`` as JSON documents, for two that are equal in Python (where ``True == 1 == 1.0``)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return all(_same_json(value, b[key]) for key, value in a.items())
    if type(a) is list:
        return all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return True


def _not_unicode(decisions: Sequence[NpcDecision]) -> str:
    """Which decision holds text that UTF-8 cannot encode, for the error that fails its world's tick."""
    for d in decisions:
        for name in ("current_activity", "location"):
            value = getattr(d, name)
            if value is not None:
                try:
                    value.encode()
                except UnicodeEncodeError:
                    return f"npc {d.npc_id}: decision {name} is not valid Unicode text"
    return "a decision holds text that is not valid Unicode"


DECISION_COLUMNS: Final = operator.attrgetter(
    "npc_id",
    "decided_at",
    "next_decision_at",
    "current_activity",
    "activity_started_at",
    "location",
    "energy",
    "mood_valence",
    "mood_arousal",
)


def state_to_write(decision: NpcDecision, npc: NpcState) -> Any:
    """The decided state to write, or ``None`` when the stored one stays.

    Equal as JSON to the state read (``1`` is not ``true``) and not the very
    dict read (a plug-in may have changed that in place): the stored one stays.
    """
    state = decision.state
    if state is None:
        return None
    read_state = npc.state
    if state is not read_state and state == read_state and _same_json(state, read_state):
        return None
    return state


def encode_state(decision: NpcDecision, state: Any) -> bytes:
    """One decided state as JSON, or the ``ValueError`` that fails its world naming the NPC."""
    try:
        return state_json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"npc {decision.npc_id}: decision state cannot be written as JSON: {exc}") from exc


def _encode_states(decided: Sequence[NpcDecision], states: Sequence[Any], written: list[Any]) -> bytes:
    """The states to write as one JSON array: encoded at once, or, unless that is plainly right, each on its own.

    Each state is written exactly as it would be alone (a ``null`` or a type
    orjson refuses in one must not send its neighbours through the standard
    library), and one that cannot be written names its NPC.
    """
    data = state_json.dumps_plain(written)
    if data is not None:
        return data
    pairs = zip(decided, states, strict=True)
    return b"[" + b",".join([encode_state(decision, state) for decision, state in pairs if state is not None]) + b"]"


def pg_columns(
    world_ids: Sequence[int], decided: Sequence[NpcDecision], states: Sequence[Any]
) -> tuple[PackedArray, ...]:
    """The grouped write's parameters: the states to write as one JSON array, then one packed array per column.

    ``states`` holds, per decision, the state to write or ``None`` (keep the
    stored one); each row gets its state's index in the array (NULL: none).
    """
    written = [s for s in states if s is not None]
    positions: list[int | None] = []
    position = 0
    for state in states:
        if state is None:
            positions.append(None)
        else:
            positions.append(position)
            position += 1
    document = _encode_states(decided, states, written)
    # One pass in C over the decisions, then one tuple per column.
    npc_ids, decided_at, next_at, activities, started, locations, energies, valences, arousals = zip(
        *map(DECISION_COLUMNS, decided), strict=True
    )
    try:
        return (
            jsonb_document(document),
            int4_array(world_ids),
            int4_array(npc_ids),
            float8_array(next_at),
            text_array(activities),
            float8_array(started),
            text_array(locations),
            float8_array(energies),
            float8_array(valences),
            float8_array(arousals),
            float8_array(decided_at),
            int4_array(positions),
        )
    except UnicodeEncodeError as exc:
        # A lone surrogate (from a plug-in decide): say which NPC and column.
        raise ValueError(f"{_not_unicode(decided)}: {exc.reason}") from None
    except ValueError:
        # A non-finite number (from a plug-in decide): say which NPC and column.
        raise ValueError(_non_finite(decided)) from None
    except (TypeError, struct.error) as exc:
        raise ValueError(f"a decision cannot be written: {exc}") from exc
