"""Whole columns packed as PostgreSQL binary arrays (the tick's grouped write), against a real PostgreSQL."""

from __future__ import annotations

import json
import math
import struct

import psycopg
import pytest

from scheduler_daemon.store.pg_arrays import (
    float8_array,
    int4_array,
    int8_array,
    jsonb_array,
    register_packed_arrays,
    text_array,
)
from tests.conftest import libpq


async def _echo(url: str, *values: object) -> tuple[object, ...]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        register_packed_arrays(conn)
        cursor = await conn.execute("SELECT " + ", ".join(["%b"] * len(values)), values)
        row = await cursor.fetchone()
        assert row is not None
        return tuple(row)


@pytest.mark.postgres
async def test_packed_columns_arrive_as_typed_arrays(pg_database_url: str) -> None:
    floats = [0.0, -0.0, 1.5, -2.25e300, 5e-324, None, 1 / 3]
    ints = [0, 1, -(2**31), 2**31 - 1, None]
    texts = ["", "Zoë ✓", 'quote " and {brace}, comma', None, "back\\slash"]
    states = [b'{"cooldowns": {"eat": 1.5}}', None, '{"k": "ü"}'.encode()]
    bigs = [0, -(2**63), 2**63 - 1, None, 2**31]
    got = await _echo(
        libpq(pg_database_url),
        float8_array(floats),
        int4_array(ints),
        text_array(texts),
        jsonb_array(states),
        int4_array([]),
        int8_array(bigs),
        int8_array([1, 2]),
    )
    assert got[0] == floats
    assert math.copysign(1, got[0][1]) == -1.0  # type: ignore[index]
    assert got[1:] == (ints, texts, [{"cooldowns": {"eat": 1.5}}, None, {"k": "ü"}], [], bigs, [1, 2])


def test_non_finite_floats_and_out_of_range_ints_are_refused_before_sending() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not a finite number"):
            float8_array([1.0, bad])
    with pytest.raises(struct.error):
        int4_array([2**31])
    with pytest.raises(struct.error):
        int8_array([2**63])


@pytest.mark.postgres
async def test_binary_jsonb_results_decode_as_the_stored_documents(pg_database_url: str) -> None:
    """The due-NPC selection reads ``state`` as binary jsonb: every document reads as the text one does."""
    documents = ['{"cooldowns": {}}', '{"big": 1180591620717411303425, "k": "Zoë ✓"}', "[1, 2.5, null]", '"s"']
    async with await psycopg.AsyncConnection.connect(libpq(pg_database_url)) as conn:
        register_packed_arrays(conn)
        for text in documents:
            cursor = await conn.execute("SELECT %s::jsonb", (text,), binary=True)
            assert await cursor.fetchone() == (json.loads(text),)
