"""Whole columns packed as PostgreSQL binary arrays, and one packed jsonb document (the tick's grouped write)."""

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
    jsonb_document,
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
    bigs = [0, -(2**63), 2**63 - 1, None, 2**31]
    got = await _echo(
        libpq(pg_database_url),
        float8_array(floats),
        int4_array(ints),
        text_array(texts),
        jsonb_document('[{"cooldowns": {"eat": 1.5}}, null, {"k": "ü"}]'.encode()),
        int4_array([]),
        int8_array(bigs),
        int8_array([1, 2]),
    )
    assert got[0] == floats
    assert math.copysign(1, got[0][1]) == -1.0  # type: ignore[index]
    assert got[1:] == (ints, texts, [{"cooldowns": {"eat": 1.5}}, None, {"k": "ü"}], [], bigs, [1, 2])


@pytest.mark.postgres
async def test_columns_without_nulls_arrive_value_for_value(pg_database_url: str) -> None:
    """A column without NULLs is packed in one pass (records spread by slices): every position, every byte."""
    floats = [0.0, -0.0, 1.5, -2.25e300, 5e-324, 1 / 3, -1e-310, 2.0**53 + 2] * 101
    ints = [0, 1, -1, -(2**31), 2**31 - 1, 256, -256, 65535] * 101
    bigs = [0, -(2**63), 2**63 - 1, 2**31, -1, 2**40 + 3] * 101
    got = await _echo(libpq(pg_database_url), float8_array(floats), int4_array(ints), int8_array(bigs))
    assert got == (floats, ints, bigs)
    assert [math.copysign(1, f) for f in got[0]] == [math.copysign(1, f) for f in floats]  # type: ignore[attr-defined]


@pytest.mark.postgres
async def test_a_text_column_repeating_values_and_nulls_packs_each_in_place(pg_database_url: str) -> None:
    """Distinct values are encoded once (the column of a batch repeats a few): every position keeps its own."""
    texts = ["inn", None, "inn", "forge", "", None, "forge", "inn", "Zoë"] * 7
    got = await _echo(libpq(pg_database_url), text_array(texts), text_array([]), text_array([None]))
    assert got == (texts, [], [None])


def test_non_finite_floats_and_out_of_range_ints_are_refused_before_sending() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not a finite number"):
            float8_array([1.0, bad])
    with pytest.raises(struct.error):
        int4_array([2**31])
    with pytest.raises(struct.error):
        int8_array([2**63])


@pytest.mark.postgres
async def test_the_jsonb_document_keeps_every_element_as_written(pg_database_url: str) -> None:
    """The grouped write's states travel as one jsonb array, each row taking its element by index."""
    elements = ['{"cooldowns": {}}', '{"big": 1180591620717411303425, "k": "Zoë ✓"}', "[1, 2.5, null]", '"s"']
    document = jsonb_document(("[" + ", ".join(elements) + "]").encode())
    async with await psycopg.AsyncConnection.connect(libpq(pg_database_url)) as conn:
        register_packed_arrays(conn)
        for index, text in enumerate(elements):
            cursor = await conn.execute("SELECT (%b -> %s)::text", (document, index))
            row = await cursor.fetchone()
            assert row is not None
            assert json.loads(row[0]) == json.loads(text)
        cursor = await conn.execute("SELECT %b -> NULL::int", (document,))
        assert await cursor.fetchone() == (None,)
