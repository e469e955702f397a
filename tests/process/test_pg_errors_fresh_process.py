"""A fresh process recognises psycopg's errors though psycopg is imported after the classification.

psycopg (the ``postgres`` extra) is loaded lazily; the store's error
classification must still see a killed session and a read-only one as
transient and needing a new connection, so the runner retries on a new
connection instead of failing the tick. The test process has imported psycopg
long before, so only a new interpreter shows the daemon's order of imports
(tests/support/pg_error_probe.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.process.test_daemon_world_time import ROOT

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

PROBE = ROOT / "tests" / "support" / "pg_error_probe.py"


def test_killed_and_read_only_sessions_are_retried_on_a_new_connection(pg_scratch_url: str) -> None:
    ran = subprocess.run(
        [sys.executable, str(PROBE), pg_scratch_url], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.splitlines()[-1])
    assert report["psycopg_loaded_with_the_classification"] is False

    killed = report["killed"]
    assert killed["result"] == 1 and killed["new_session"], killed
    [error] = killed["errors"]
    # AdminShutdown (57P01) when the server's goodbye is read, else a bare OperationalError: transient either way.
    assert error["transient"] and error["database_error"], error
    if error["sqlstate"] is not None:
        assert error["sqlstate"] == "57P01" and error["needs_new_connection"], error

    read_only = report["read_only"]
    assert isinstance(read_only["result"], int), read_only
    [error] = read_only["errors"]
    assert error["sqlstate"] == "25006", error
    assert error["needs_new_connection"] and error["invalidated"] and error["transient"], error
