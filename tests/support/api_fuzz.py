"""Schemathesis over the admin API's own /openapi.json, shared by the API and fault suites.

Driven by hypothesis directly: schemathesis' pytest plugin does not support
this pytest version. One property per operation and generation mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

#: ``around(case, call)``: runs one generated case; ``call()`` sends it and validates the answer.
Around = Callable[[Any, Callable[[], Any]], None]


def fuzz_admin_api(
    base_url: str,
    token: str,
    *,
    examples: int,
    world_ids: tuple[int, ...],
    around: Around | None = None,
) -> int:
    """Generated requests, valid and invalid, against every operation; returns how many were sent.

    No answer may be a 5xx or break the documented schema (:data:`CHECKS`).
    Positive cases mostly address ``world_ids`` (so bodies reach the real
    handlers); negative ones go anywhere. The last of ``world_ids`` should
    not exist: deleting a world goes there, so the others stay for the
    remaining operations. ``around`` wraps each call (e.g. to check the
    database before and after it).
    """
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    auth = {"Authorization": f"Bearer {token}"}
    sent = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            positive = mode is GenerationMode.POSITIVE
            pinned = _pinned_world(operation, world_ids) if positive else None
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=pinned)

            @given(case=strategy)
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case: Any) -> None:
                nonlocal sent
                sent += 1

                def call() -> Any:
                    return case.call_and_validate(base_url=base_url, headers=auth, checks=CHECKS, timeout=30)

                if around is None:
                    call()
                else:
                    around(case, call)

            try:
                check()
            except Unsatisfiable:
                assert not positive, operation.label  # nothing to make invalid (no parameters, no body)
            except Exception as exc:
                raise AssertionError(f"{operation.label} ({mode.value}): {exc}") from exc
    return sent


def _pinned_world(operation: Any, world_ids: tuple[int, ...]) -> dict[str, Any] | None:
    """The path parameters naming a world: one of ``world_ids`` per operation (the ingest routes' ``{world}`` too)."""
    if operation.method.upper() == "DELETE" and operation.path == "/api/v1/worlds/{world}":
        return {"world": str(world_ids[-1])}
    world = world_ids[len(operation.path) % len(world_ids)]
    if "{world_id}" in operation.path:
        return {"world_id": world}
    if "{world}" in operation.path:
        return {"world": str(world)}
    return None
