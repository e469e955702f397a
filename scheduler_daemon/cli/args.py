"""Argument types: each value checked with a message naming what was expected."""

from __future__ import annotations

import argparse


def _int_in(text: str, low: int, high: int, *, not_an_int: str, out_of_range: str) -> int:
    """``text`` as an integer in ``[low, high]``; the messages name what was expected (``{text}``, ``{value}``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_an_int.format(text=repr(text))) from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(out_of_range.format(value=value))
    return value


def world_id_arg(text: str) -> int:
    return _int_in(
        text,
        1,
        2**31 - 1,
        not_an_int="world id must be an integer, got {text}",
        out_of_range="world id out of range: {value}",
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def request_id_arg(text: str) -> int:
    return _int_in(
        text,
        1,
        2**63 - 1,
        not_an_int="request id must be an integer, got {text}",
        out_of_range="request id out of range: {value}",
    )


def limit_arg(text: str) -> int:
    return _int_in(
        text,
        1,
        100_000,
        not_an_int="expected a positive integer, got {text}",
        out_of_range="expected 1 … 100000, got {value}",
    )


def workers_arg(text: str) -> int:
    return _int_in(
        text,
        1,
        64,
        not_an_int="expected a number of workers, got {text}",
        out_of_range="expected 1 … 64 workers, got {value}",
    )
