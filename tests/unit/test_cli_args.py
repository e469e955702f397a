"""The CLI's argument types: each bad value is refused with a message naming what was expected."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from scheduler_daemon.cli.args import limit_arg, positive_float, request_id_arg, workers_arg, world_id_arg


@pytest.mark.parametrize(
    ("check", "text", "message"),
    [
        (world_id_arg, "x", "world id must be an integer, got 'x'"),
        (world_id_arg, "0", "world id out of range: 0"),
        (world_id_arg, "2147483648", "world id out of range: 2147483648"),
        (request_id_arg, "1.5", "request id must be an integer, got '1.5'"),
        (request_id_arg, str(2**63), f"request id out of range: {2**63}"),
        (limit_arg, "many", "expected a positive integer, got 'many'"),
        (limit_arg, "100001", "expected 1 … 100000, got 100001"),
        (workers_arg, "-1", "expected 1 … 64 workers, got -1"),
        (workers_arg, "two", "expected a number of workers, got 'two'"),
        (positive_float, "inf", "expected a positive finite number, got 'inf'"),
        (positive_float, "nan", "expected a positive finite number, got 'nan'"),
        (positive_float, "soon", "expected a number, got 'soon'"),
    ],
)
def test_a_bad_value_is_refused_with_what_was_expected(check: Callable[[str], object], text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        check(text)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("check", "text", "value"),
    [
        (world_id_arg, "1", 1),
        (world_id_arg, "2147483647", 2**31 - 1),
        (request_id_arg, str(2**63 - 1), 2**63 - 1),
        (limit_arg, "100000", 100_000),
        (workers_arg, "64", 64),
        (positive_float, "0.5", 0.5),
    ],
)
def test_a_value_at_the_edge_is_taken(check: Callable[[str], object], text: str, value: object) -> None:
    assert check(text) == value
