"""What JSON values and text both databases can store: checked before a write, so bad input is a 422, never a 5xx.

PostgreSQL refuses NUL characters in text and JSONB, neither database takes
lone surrogates (not UTF-8) or NaN/Infinity in JSON, and absurd nesting would
cost the recursion of every later reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Deepest JSON nesting accepted in a stored object (a config patch, a world's meta, an NPC's state).
MAX_JSON_DEPTH = 32


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or ``None``."""
    if "\x00" in value:
        return "NUL characters are not allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode (lone surrogate)"
    return None


def storable_problems(value: Any, path: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(dotted path, message) for each value JSON columns on both databases cannot store."""
    if depth > MAX_JSON_DEPTH:
        return [(path, f"nested deeper than {MAX_JSON_DEPTH} levels")]
    if isinstance(value, str):
        problem = text_problem(value)
        return [] if problem is None else [(path, problem)]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, "value must be a finite number")]
    if isinstance(value, Mapping):
        problems = []
        for k, v in value.items():
            key_path = f"{path}.{k}" if path else str(k)
            problems += storable_problems(k, key_path, depth + 1)
            problems += storable_problems(v, key_path, depth + 1)
        return problems
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in storable_problems(v, f"{path}.{i}", depth + 1)]
    return []
