"""A one-line progress bar on a terminal (stderr), redrawn in place; nothing at all when off.

Shared by the long commands (``import``, ``simulate``, ``db upgrade``): on
only when a person is watching, never in a pipe, a file or a log.
"""

from __future__ import annotations

import time
from typing import IO, Final

#: Redraws at most this often: a file of many small worlds must not be slowed by drawing.
REDRAW_SECONDS: Final = 0.1
BAR_WIDTH: Final = 30


def wanted(stream: IO[str], *, quiet: bool) -> bool:
    """Whether to draw on ``stream``: it is a terminal and ``--quiet`` was not given."""
    return not quiet and stream.isatty()


class ProgressBar:
    """``label  42% [#########---------] 3 worlds, 1200 NPCs`` on one line of ``stream``.

    ``total`` (in whatever unit :meth:`update` is given: bytes, worlds) makes
    the percentage and the bar; without it only the counts are shown.
    Messages go through :meth:`print`, which clears the bar first so the two
    never mix on one line. Disabled, it draws nothing and :meth:`print`
    just writes.
    """

    def __init__(self, stream: IO[str], label: str, total: int | None, *, enabled: bool) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._enabled = enabled
        self._done = 0
        self._counts = ""
        self._drawn = 0  # characters of the bar now on screen
        self._last_draw = float("-inf")

    def update(self, done: int, counts: str) -> None:
        """Progress so far (``done`` of ``total``) and the counts to show after the bar."""
        self._done, self._counts = done, counts
        now = time.monotonic()
        if self._enabled and now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._draw()

    def print(self, message: str) -> None:
        """One message line above the bar."""
        self._clear()
        self._stream.write(message + "\n")
        if self._enabled and self._done:
            self._draw()
        self._stream.flush()

    def close(self) -> None:
        """Draw the final state once and end its line (a terminal keeps the finished bar)."""
        if self._enabled and self._done:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = 0

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _draw(self) -> None:
        text = self._label
        if self._total:
            share = min(self._done / self._total, 1.0)
            filled = round(share * BAR_WIDTH)
            text += f" {share:4.0%} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"
        text += f" {self._counts}"
        self._clear()
        self._stream.write(text)
        self._stream.flush()
        self._drawn = len(text)
