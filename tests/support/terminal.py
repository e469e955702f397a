"""Running the command as a user would: stderr on a pseudo-terminal, stdout into a pipe nobody reads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def run_on_pty(args: list[str], env: Mapping[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``python -m scheduler_daemon ARGS`` with stderr on a pseudo-terminal; exit code and what it wrote there."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", *args],
            env=dict(env),
            stdout=subprocess.DEVNULL,
            stderr=slave,
            cwd=cwd,
        )
        os.close(slave)
        chunks = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode()
    finally:
        os.close(master)


def run_into_closed_pipe(args: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m scheduler_daemon ARGS`` with stdout a pipe whose reader is gone (``… | head -0``).

    The read end is closed before the process starts, so its first write to
    stdout fails, whatever the size of the output.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "scheduler_daemon", *args],
            env=dict(env),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=cwd,
        )
    finally:
        os.close(write_end)
