"""NPC ``state`` documents on the tick's hot path: orjson, with the standard library where orjson refuses.

Decoding and encoding every decided NPC's state with :mod:`json` was a
quarter of the tick's CPU (docs/performance.md). orjson refuses integers
beyond 64 bits (PostgreSQL's ``jsonb`` keeps any numeric) and types it does
not know; those documents go through :mod:`json` as before, so no row is
refused that was read before. orjson writes a non-finite float as ``null``
(JSON has no NaN).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode one JSON document (a psycopg ``json``/``jsonb`` loader, or SQLite's text)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)


def dumps(value: Any) -> bytes:
    """Encode one JSON document as UTF-8."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, allow_nan=False).encode()
