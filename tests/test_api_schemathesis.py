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
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_daemon_process import cli  # noqa: E402
from tests.test_http_process import TOKEN, Daemon, base_env, start_daemon, stop  # noqa: E402

pytestmark = pytest.mark.subprocess

EXAMPLES = int(os.environ.get("SCHEDULER_SCHEMATHESIS_EXAMPLES", "12"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


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
    # Driven by hypothesis directly: schemathesis' pytest plugin does not
    # support this pytest version. One property per operation and mode.
    schema = schemathesis.openapi.from_url(f"{live_daemon.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Mostly the seeded worlds 1..3 (plus unknown 4), so bodies reach the real handlers.
            positive = mode is GenerationMode.POSITIVE
            pinned = {"world_id": 1 + len(operation.path) % 4} if positive and "{world_id}" in operation.path else None
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=pinned)

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case: Any) -> None:
                case.call_and_validate(base_url=live_daemon.url, headers=auth, checks=CHECKS, timeout=30)

            try:
                check()
            except Unsatisfiable:
                assert not positive, operation.label  # nothing to make invalid (no parameters, no body)
            except Exception as exc:
                raise AssertionError(f"{operation.label} ({mode.value}): {exc}") from exc
