"""What the grouped NPC write sends of each decision: its columns packed, and its state only when it changed.

Pure encoding, no I/O (:meth:`~scheduler_daemon.store.ticks.Ticks.write_decisions_many`
runs the statement). A decision that cannot be written (a plug-in's NaN, a
NUL character or a lone surrogate, an over-long place, a state JSON cannot
hold) fails its world with an error that names the NPC and the column, under
the same rules on both databases (SQLite would store most of them as given).
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from scheduler_daemon.entities import MAX_TEXT
from scheduler_daemon.simulation.npc import NpcDecision, NpcState
from scheduler_daemon.storable import text_problem
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
_OPTIONAL_NUMBER: Final = "activity_started_at"  # the one number column that may be null
_DECISION_TEXTS: Final = ("current_activity", "location")
_REQUIRED_NUMBERS: Final = operator.attrgetter(*(n for n in _DECISION_NUMBERS if n != _OPTIONAL_NUMBER))
_TEXTS: Final = operator.attrgetter(*_DECISION_TEXTS)
_PLAIN_NUMBERS: Final = frozenset((float, int, bool))
#: In a JSON text, a NUL character: its escape, after an even number of backslashes
#: (the text ``\\u0000``, a backslash then ``u0000``, is harmless).
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _number_problem(value: Any) -> str | None:
    if type(value) is not float:
        if not isinstance(value, int | float):
            return f"is not a number ({type(value).__name__})"
        try:
            value = float(value)
        except OverflowError:
            return "is too large to be stored as a float"
    return None if math.isfinite(value) else f"is not a finite number ({value!r})"


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"is not text ({type(value).__name__})"
    if "\x00" in value:
        return "holds a NUL character, which cannot be stored"
    if len(value) > MAX_TEXT:
        return f"is longer than {MAX_TEXT} characters ({len(value)})"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode text (lone surrogate)"
    return None


def unwritable(decisions: Sequence[NpcDecision]) -> str | None:
    """Why one of ``decisions`` (a plug-in's) cannot be written, naming its NPC and column; ``None`` if all can.

    The same rules on both databases: an int or a float that is finite as a
    float in each number column (``activity_started_at`` may be null), text
    without NUL characters or lone surrogates and at most
    :data:`~scheduler_daemon.entities.MAX_TEXT` characters (or null) in
    ``current_activity`` and ``location``.
    """
    for d in decisions:
        for name in _DECISION_NUMBERS:
            value = getattr(d, name)
            if value is None and name == _OPTIONAL_NUMBER:
                continue
            problem = _number_problem(value)
            if problem is not None:
                return f"npc {d.npc_id}: decision {name} {problem}"
        for name in _DECISION_TEXTS:
            value = getattr(d, name)
            problem = None if value is None else _text_problem(value)
            if problem is not None:
                return f"npc {d.npc_id}: decision {name} {problem}"
    return None


def check_decisions(decisions: Sequence[NpcDecision]) -> None:
    """Raise the ``ValueError`` of :func:`unwritable` if one of ``decisions`` cannot be written.

    A few passes in C when all can: the types of the numbers, one exact sum of
    them as floats (NaN, infinities and what no float can hold spoil it) and a
    look at each distinct text; only then is each decision looked at.
    """
    required = list(itertools.chain.from_iterable(map(_REQUIRED_NUMBERS, decisions)))
    started = [d.activity_started_at for d in decisions if d.activity_started_at is not None]
    try:
        suspect = not _PLAIN_NUMBERS.issuperset(map(type, required)) or not _PLAIN_NUMBERS.issuperset(
            map(type, started)
        )
        suspect = suspect or not math.isfinite(math.fsum(required) + math.fsum(started))
        if not suspect:
            texts = set(itertools.chain.from_iterable(map(_TEXTS, decisions)))
            texts.discard(None)
            suspect = any(map(_text_problem, texts))
    except (TypeError, ValueError, OverflowError):  # no number, inf - inf, no float; unhashable text
        suspect = True
    if suspect:
        problem = unwritable(decisions)
        if problem is not None:
            raise ValueError(problem)


def _state_problem(decision: NpcDecision, state: Any) -> str | None:
    """The first key or text in a decided state that neither database can store, naming the NPC, or ``None``."""
    stack: list[tuple[str, Any]] = [("", state)]
    while stack:  # not recursive: a state may nest deeper than the interpreter's stack
        path, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                return f"npc {decision.npc_id}: decision state cannot be stored: {path or 'state'}: {problem}"
        elif isinstance(value, Mapping):
            for key, item in value.items():
                key_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and (problem := text_problem(key)) is not None:
                    return f"npc {decision.npc_id}: decision state cannot be stored: key {key_path}: {problem}"
                stack.append((key_path, item))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value))
    return None


def _same_json(a: Any, b: Any) -> bool:
    """``a == b`` as JSON documents, for two that are equal in Python (where ``True == 1 == 1.0``)."""
    if type(a) is not type(b):
        return False
    # Scalars are compared in the loops, containers by recursion: a state is
    # mostly scalars, and a call (or a generator) per value cost more than the comparison.
    if type(a) is dict:
        for key, x in a.items():
            y = b[key]
            kind = type(x)
            if kind is not type(y) or ((kind is dict or kind is list) and not _same_json(x, y)):
                return False
    elif type(a) is list:
        for x, y in zip(a, b, strict=True):
            kind = type(x)
            if kind is not type(y) or ((kind is dict or kind is list) and not _same_json(x, y)):
                return False
    return True


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
        data = state_json.dumps(state)
    except (TypeError, ValueError) as exc:
        # A lone surrogate fails the encoding to UTF-8: say where it is.
        problem = _state_problem(decision, state) if isinstance(exc, UnicodeEncodeError) else None
        raise ValueError(problem or f"npc {decision.npc_id}: decision state cannot be written as JSON: {exc}") from exc
    if b"\\u0000" in data and _NUL_ESCAPE.search(data) is not None:
        problem = _state_problem(decision, state)
        if problem is not None:
            raise ValueError(problem)
    return data


def _encode_states(decided: Sequence[NpcDecision], states: Sequence[Any], written: list[Any]) -> bytes:
    """The states to write as one JSON array: encoded at once, or, unless that is plainly right, each on its own.

    Each state is written exactly as it would be alone (a ``null`` or a type
    orjson refuses in one must not send its neighbours through the standard
    library), and one that cannot be written names its NPC.
    """
    data = state_json.dumps_plain(written)
    pairs = zip(decided, states, strict=True)
    if data is not None:
        if b"\\u0000" in data and _NUL_ESCAPE.search(data) is not None:  # an escaped NUL, which jsonb refuses
            for decision, state in pairs:
                problem = None if state is None else _state_problem(decision, state)
                if problem is not None:
                    raise ValueError(problem)
        return data
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
    # A list comprehension per column: half the cost of transposing one tuple per decision.
    npc_ids = [d.npc_id for d in decided]
    decided_at = [d.decided_at for d in decided]
    next_at = [d.next_decision_at for d in decided]
    activities = [d.current_activity for d in decided]
    started = [d.activity_started_at for d in decided]
    locations = [d.location for d in decided]
    energies = [d.energy for d in decided]
    valences = [d.mood_valence for d in decided]
    arousals = [d.mood_arousal for d in decided]
    try:
        return (
            jsonb_document(document),
            int4_array(world_ids),
            int4_array(npc_ids),
            float8_array(next_at, nullable=False),
            text_array(activities, max_chars=MAX_TEXT),
            float8_array(started),
            text_array(locations, max_chars=MAX_TEXT),
            float8_array(energies, nullable=False),
            float8_array(valences, nullable=False),
            float8_array(arousals, nullable=False),
            float8_array(decided_at, nullable=False),
            int4_array(positions),
        )
    except (ValueError, TypeError, AttributeError, OverflowError, struct.error) as exc:
        # A plug-in decide's bad value: say which NPC and column.
        raise ValueError(unwritable(decided) or f"a decision cannot be written: {exc}") from None
