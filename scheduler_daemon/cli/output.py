"""Shared output of the commands: tables, JSON lines, and a reader that goes away."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Rows under a header, columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def print_json_lines(items: Iterable[Mapping[str, Any]]) -> None:
    """``--json`` of a listing: one JSON object per line (no line for an empty listing)."""
    for item in items:
        print(json.dumps(item, default=str))


def open_closed_streams() -> None:
    """Put /dev/null in place of a standard stream the shell closed (``>&-``, ``2>&-``, ``<&-``).

    Python makes such a stream ``None``: every print, progress bar and log
    handler would fail on it with a traceback, and an error meant for a closed
    stderr would land on stdout. In order, so the file takes the closed
    descriptor's number and child processes inherit a valid one.
    """
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, Path(os.devnull).open(mode, encoding="utf-8"))  # noqa: SIM115 (the process's life)


def silence_stdout() -> None:
    """Point stdout at /dev/null after the reader closed the pipe (``… | head -1``).

    Python flushes stdout again at exit; without this that flush fails on the
    closed pipe too and prints a traceback (the pattern of Python's signal docs).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
