"""Property-based run of the whole admin API from its own /openapi.json (schemathesis).

A real daemon (SQLite, seeded demo worlds, HTTP on a free port) answers
generated requests, valid and invalid; no answer may be a 5xx or break the
documented schema. Examples per operation: ``SCHEDULER_SCHEMATHESIS_EXAMPLES``
(default small, so ``make test`` stays fast; raise it for a longer hunt).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from tests.process.test_daemon_world_time import cli  # noqa: E402
from tests.process.test_http_process import TOKEN, Daemon, base_env, start_daemon, stop  # noqa: E402
from tests.support.api_fuzz import fuzz_admin_api  # noqa: E402

pytestmark = pytest.mark.subprocess

EXAMPLES = int(os.environ.get("SCHEDULER_SCHEMATHESIS_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp_path = tmp_path_factory.mktemp("schemathesis")
    env = base_env(f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}", tmp_path)
    assert cli("db", "upgrade", env=env).returncode == 0
    assert cli("demo", env=env).returncode == 0
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(short) / "notify.sock"))
        try:
            daemon = start_daemon(env, tmp_path, notify)
        finally:
            notify.close()
    try:
        yield daemon
    finally:
        code = stop(daemon)
        assert code == 0, daemon.log.read_text()[-2000:]


def test_api_never_errors_and_matches_its_schema(live_daemon: Daemon) -> None:
    # Mostly the seeded worlds 1..3 (plus unknown 4), so bodies reach the real handlers.
    assert fuzz_admin_api(live_daemon.url, TOKEN, examples=EXAMPLES, world_ids=(1, 2, 3, 4)) > 0
