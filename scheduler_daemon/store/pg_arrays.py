"""The tick's binary wire formats: whole columns sent as PostgreSQL arrays (and one ``jsonb`` document).

psycopg dumps a Python list element by element in Python, and text arrays
need a ``repr`` per float; packing the binary wire format ourselves costs a
fraction of either (docs/performance.md). A packed value is a
:class:`PackedArray`; :func:`register_packed_arrays` teaches a psycopg
connection to send it as-is with its type. Packing needs no psycopg (the
``postgres`` extra): it is imported only when a connection is set up.
"""

from __future__ import annotations

import array
import functools
import math
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

_INT4_OID: Final = 23
_INT8_OID: Final = 20
_TEXT_OID: Final = 25
_FLOAT8_OID: Final = 701
_JSONB_OID: Final = 3802
_INT4_ARRAY_OID: Final = 1007
_INT8_ARRAY_OID: Final = 1016
_TEXT_ARRAY_OID: Final = 1009
_FLOAT8_ARRAY_OID: Final = 1022
#: The binary jsonb format: a version byte, then the JSON text.
_JSONB_VERSION: Final = b"\x01"
_LENGTH: Final = struct.Struct(">i")
#: ndim, has-nulls flag, element oid, then (length, lower bound) of the one dimension.
_HEADER: Final = struct.Struct(">iiIii")
_NULL: Final = -1
_LITTLE_ENDIAN: Final = sys.byteorder == "little"


class PackedArray:
    """One column's values in PostgreSQL's binary array format."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Float8Array(PackedArray):
    """A packed ``float8[]``."""

    __slots__ = ()


class Int4Array(PackedArray):
    """A packed ``int4[]``."""

    __slots__ = ()


class Int8Array(PackedArray):
    """A packed ``int8[]``."""

    __slots__ = ()


class TextArray(PackedArray):
    """A packed ``text[]``."""

    __slots__ = ()


class JsonbDocument(PackedArray):
    """One ``jsonb`` value in its binary format (not an array: the one non-array parameter packed here)."""

    __slots__ = ()


def _pack(values: Sequence[Any], code: str, size: int, element_oid: int) -> bytes:
    count = len(values)
    try:
        # The values as one big-endian C array, then spread into (length, value)
        # records by slice assignments: a few C calls per column, not one per value.
        items = array.array(code, values)
    except OverflowError as exc:
        raise struct.error(str(exc)) from None
    except TypeError:
        if None not in values:
            raise
        # NULLs (no length-prefixed value): one record at a time.
        one = struct.Struct(">i" + code)
        null = struct.pack(">i", _NULL)
        parts = [null if v is None else one.pack(size, v) for v in values]
        return _HEADER.pack(1, 1, element_oid, count, 1) + b"".join(parts)
    if _LITTLE_ENDIAN:
        items.byteswap()
    data = items.tobytes()
    record = 4 + size
    body = bytearray(record * count)
    body[3::record] = bytes((size,)) * count  # the length, big-endian: three zero bytes, then size
    for k in range(size):
        body[4 + k :: record] = data[k::size]
    return _HEADER.pack(1, 0, element_oid, count, 1) + body


def float8_array(values: Sequence[float | None], *, finite: bool = True, nullable: bool = True) -> Float8Array:
    """A ``float8[]`` of ``values`` (``None`` is NULL).

    Raises ``ValueError`` on NaN or an infinity, if ``finite``, and on a
    ``None`` unless ``nullable``.
    """
    if finite:
        # One sum tells whether every value is finite (NaN and infinities poison it);
        # only then is each value looked at. filter(None, …) drops NULLs (and zeros).
        try:
            try:
                total = sum(values)  # type: ignore[arg-type]
            except TypeError:
                if not nullable and None in values:
                    raise ValueError("NULL in a column that cannot hold it") from None
                total = sum(filter(None, values))  # type: ignore[arg-type]
            suspect = not math.isfinite(total)
        except OverflowError:  # ints summed past a float's range, each of them maybe within it
            suspect = True
        if suspect:
            bad = next((v for v in values if v is not None and not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"not a finite number: {bad!r}")
    elif not nullable and None in values:
        raise ValueError("NULL in a column that cannot hold it")
    return Float8Array(_pack(values, "d", 8, _FLOAT8_OID))


def int4_array(values: Sequence[int | None]) -> Int4Array:
    """An ``int4[]`` of ``values`` (``None`` is NULL); ``struct.error`` if one does not fit 32 bits."""
    return Int4Array(_pack(values, "i", 4, _INT4_OID))


def int8_array(values: Sequence[int | None]) -> Int8Array:
    """An ``int8[]`` of ``values`` (``None`` is NULL); ``struct.error`` if one does not fit 64 bits."""
    return Int8Array(_pack(values, "q", 8, _INT8_OID))


def text_array(values: Sequence[str | None], *, max_chars: int | None = None) -> TextArray:
    """A ``text[]`` of ``values`` (``None`` is NULL).

    Raises ``ValueError`` on a value PostgreSQL's text cannot hold (a NUL
    character) or longer than ``max_chars``, ``UnicodeEncodeError`` on a lone surrogate.
    """
    # A column of a batch repeats a few values (activities, places): each
    # distinct one is encoded and checked once.
    pack = _LENGTH.pack
    encoded = {v: pack(_NULL) if v is None else pack(len(b := v.encode())) + b for v in set(values)}
    for value in encoded:
        if value is not None and ("\x00" in value or (max_chars is not None and len(value) > max_chars)):
            raise ValueError(f"text PostgreSQL cannot store in this column: {value[:40]!r}")
    has_null = 1 if None in encoded else 0
    header = _HEADER.pack(1, has_null, _TEXT_OID, len(values), 1)
    return TextArray(header + b"".join(map(encoded.__getitem__, values)))


def jsonb_document(text: bytes) -> JsonbDocument:
    """A ``jsonb`` value of one UTF-8 JSON text; PostgreSQL checks it."""
    return JsonbDocument(_JSONB_VERSION + text)


@functools.cache
def _dumpers() -> tuple[tuple[type[PackedArray], type[Any]], ...]:
    # Built on first use: psycopg is not imported on SQLite-only installs.
    from psycopg import adapt, pq

    def dumper(type_oid: int) -> type[adapt.Dumper]:
        class PackedArrayDumper(adapt.Dumper):
            format = pq.Format.BINARY
            oid = type_oid

            def dump(self, obj: PackedArray) -> bytes:
                return obj.data

        return PackedArrayDumper

    return (
        (Float8Array, dumper(_FLOAT8_ARRAY_OID)),
        (Int4Array, dumper(_INT4_ARRAY_OID)),
        (Int8Array, dumper(_INT8_ARRAY_OID)),
        (TextArray, dumper(_TEXT_ARRAY_OID)),
        (JsonbDocument, dumper(_JSONB_OID)),
    )


def register_packed_arrays(connection: Any) -> None:
    """Let ``connection`` (a psycopg connection) send :class:`PackedArray` parameters as they are."""
    for cls, dumper in _dumpers():
        connection.adapters.register_dumper(cls, dumper)
