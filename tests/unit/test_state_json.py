"""NPC state documents: orjson where its result is certain, the standard library where it is not."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime

import pytest

from scheduler_daemon.store import state_json


@pytest.mark.parametrize(
    "value",
    [
        {"cooldowns": {"eat": 1.5e9}},
        [1, 2.5, "Zoë ✓"],
        {"deep": [{"a": [True, False]}]},
        {},
        [],
        {"id": uuid.UUID(int=5)},
    ],
)
def test_a_plain_document_encodes_at_once_as_dumps_does(value: object) -> None:
    data = state_json.dumps_plain(value)
    assert data is not None
    assert data == state_json.dumps(value)
    assert json.loads(data) == json.loads(state_json.dumps(value))


@pytest.mark.parametrize(
    "value",
    [
        {"x": None},  # a null may stand for a NaN orjson wrote: left to dumps()
        {"score": math.nan},
        [math.inf],
        {"seen": datetime(2026, 12, 7, tzinfo=UTC)},  # orjson would write a string; the standard library refuses
        {"big": 2**70},  # orjson refuses integers past 64 bits
    ],
)
def test_a_document_orjson_cannot_settle_alone_is_left_to_dumps(value: object) -> None:
    assert state_json.dumps_plain(value) is None


def test_dumps_refuses_what_json_has_no_value_for() -> None:
    with pytest.raises(ValueError):
        state_json.dumps({"score": math.nan})
    with pytest.raises(TypeError):
        state_json.dumps({"seen": datetime(2026, 12, 7, tzinfo=UTC)})
    assert json.loads(state_json.dumps({"big": 2**70, "x": None})) == {"big": 2**70, "x": None}


@pytest.mark.parametrize("as_type", [str, bytes, memoryview])
def test_a_run_of_19_digits_is_read_by_the_standard_library_exactly(as_type: type) -> None:
    """orjson would read an integer past 64 bits as a float: any run of 19 digits goes to the standard library."""
    text = '{"big": 1180591620717411303425, "n": -12345678901234567890, "k": "Zoë ✓", "f": 0.1234567890123456789}'
    data = text if as_type is str else text.encode() if as_type is bytes else memoryview(text.encode())
    got = state_json.loads(data)
    assert got == json.loads(text)
    assert type(got["big"]) is int and got["big"] == 1180591620717411303425
    lone = state_json.loads('{"short": 123456789012345678, "s": "\\ud800"}')
    assert lone == {"short": 123456789012345678, "s": "\ud800"}
