"""NPC ``state`` documents on the tick's hot path: orjson, with the standard library where orjson refuses.

Decoding and encoding every decided NPC's state with :mod:`json` was a
quarter of the tick's CPU (docs/performance.md). orjson reads an integer
beyond 64 bits as a float (PostgreSQL's ``jsonb`` keeps any numeric), which
would round a game's number on the next write: a document with a run of 19
digits goes through :mod:`json`, as does one orjson refuses, so every
document reads as it did before. orjson writes a non-finite float as
``null`` (JSON has no NaN): a document with one is refused, as before.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

#: Every ASCII digit to ``0``, every other byte to ``x``: a run of 19 digits becomes
#: a run of 19 zeros, found by a substring search (a regex took longer than orjson's parse).
_DIGITS_AS_ZEROS: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_LONG_RUN: Final = b"0" * 19
#: Datetimes and dataclasses go to the standard library, which refuses them
#: (orjson would write them as strings and objects, read back as such).
_REFUSE_AS_JSON_DOES: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode one JSON document (a psycopg ``json``/``jsonb`` loader, or SQLite's text)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if _LONG_RUN not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    # The standard library reads neither memoryviews nor what orjson refused quietly.
    return json.loads(bytes(data) if type(data) is memoryview else data)


def dumps_plain(value: Any) -> bytes | None:
    """orjson's encoding of ``value`` when it is certainly what :func:`dumps` returns, else ``None``.

    ``None`` where orjson refuses, or where its text holds a ``null`` (which
    may stand for a NaN that :func:`dumps` refuses): a caller encoding many
    documents at once encodes them one by one instead.
    """
    try:
        data = orjson.dumps(value, option=_REFUSE_AS_JSON_DOES)
    except TypeError:
        return None
    return None if b"null" in data else data


def dumps(value: Any) -> bytes:
    """Encode one JSON document as UTF-8; ``ValueError`` on NaN or an infinity (JSON has none) or a lone surrogate."""
    try:
        data = orjson.dumps(value, option=_REFUSE_AS_JSON_DOES)
    except TypeError:
        # UTF-8 as orjson writes it: a lone surrogate fails the encoding (UnicodeEncodeError).
        return json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    if b"null" in data:
        # orjson writes a non-finite float as null: the standard library refuses it,
        # so a plug-in's NaN fails its world's tick instead of being stored as null.
        json.dumps(value, allow_nan=False)
    return data
