"""Generation requests: validation, claim planning under quotas, retry backoff. Pure.

A tick hands generation requests to workers with backpressure: at most
``maxJobOpsPerStep`` claims per tick, and never more than
``generation.maxInFlightPerWorld`` in flight (``enqueued`` + ``running``) for
the world, nor ``generation.maxInFlightPerUser`` for one user. The store
fetches candidates in priority order; :func:`plan_claims` decides which of
them to take. A failed hand-off backs off in *world* time
(:func:`retry_after_failure`), so the retry is deterministic on a virtual
clock and never depends on the wall clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
ENQUEUED = "enqueued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (PENDING, ENQUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
#: Counted against the quotas.
IN_FLIGHT = (ENQUEUED, RUNNING)
#: Terminal.
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
#: What a worker may report.
COMPLETION_STATUSES = (SUCCEEDED, FAILED)

MAX_KIND_LENGTH = 100
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_PRIORITY = 1_000_000
MAX_ERROR_LENGTH = 4000
#: Upper bound of the exponential hand-off backoff, in real seconds.
MAX_BACKOFF_SECONDS = 3600.0


class GenerationRequestError(ValueError):
    """A generation request is malformed; the message names the field."""


def validate_kind(kind: object) -> str:
    """A non-empty kind of at most :data:`MAX_KIND_LENGTH` characters."""
    if not isinstance(kind, str) or not kind.strip():
        raise GenerationRequestError(f"kind: expected a non-empty string, got {kind!r}")
    if len(kind) > MAX_KIND_LENGTH:
        raise GenerationRequestError(f"kind: longer than {MAX_KIND_LENGTH} characters")
    return kind


def validate_payload(payload: object) -> dict[str, Any]:
    """A JSON object (finite numbers only, at most :data:`MAX_PAYLOAD_BYTES` encoded)."""
    if not isinstance(payload, Mapping):
        raise GenerationRequestError(f"payload: expected a JSON object, got {type(payload).__name__}")
    if not all(isinstance(k, str) for k in payload):
        raise GenerationRequestError("payload: object keys must be strings")
    try:
        encoded = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GenerationRequestError(f"payload: not JSON-serialisable: {exc}") from None
    if len(encoded.encode()) > MAX_PAYLOAD_BYTES:
        raise GenerationRequestError(f"payload: larger than {MAX_PAYLOAD_BYTES} bytes encoded")
    decoded: dict[str, Any] = json.loads(encoded)  # a plain, detached copy
    return decoded


def validate_priority(priority: object) -> int:
    """An integer in ``[-MAX_PRIORITY, MAX_PRIORITY]``; higher is served first."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise GenerationRequestError(f"priority: expected an integer, got {priority!r}")
    if abs(priority) > MAX_PRIORITY:
        raise GenerationRequestError(f"priority: must be within ±{MAX_PRIORITY}, got {priority}")
    return priority


def row_problem(kind: object, payload: object) -> str | None:
    """Why a stored row cannot be handed out (``None`` if it can)."""
    try:
        validate_kind(kind)
        validate_payload(payload)
    except GenerationRequestError as exc:
        return f"invalid stored request: {exc}"
    return None


def claim_budget(max_job_ops_per_step: int, max_in_flight_per_world: int, in_flight_total: int) -> int:
    """How many requests one tick may claim: the per-tick budget within the world's quota."""
    return max(0, min(max_job_ops_per_step, max_in_flight_per_world - in_flight_total))


@dataclass(frozen=True, slots=True)
class Candidate:
    """A pending request as the claim sees it (in priority order from the store)."""

    id: int
    user_id: str


@dataclass(slots=True)
class ClaimPlan:
    """Which candidates one claim takes under the quotas."""

    claim: list[int] = field(default_factory=list)
    in_flight_per_user: dict[str, int] = field(default_factory=dict)
    considered: int = 0  # candidates looked at before the budget ran out


def plan_claims(
    candidates: Iterable[Candidate],
    *,
    budget: int,
    in_flight_per_user: Mapping[str, int],
    per_user_cap: int,
) -> ClaimPlan:
    """Take candidates in order until ``budget`` is used, skipping users at their cap.

    ``in_flight_per_user`` of the result includes the new claims. Payloads
    are checked afterwards (:func:`split_broken`), only for the rows taken.
    """
    plan = ClaimPlan(in_flight_per_user=dict(in_flight_per_user))
    for c in candidates:
        if len(plan.claim) >= budget:
            break
        plan.considered += 1
        if plan.in_flight_per_user.get(c.user_id, 0) >= per_user_cap:
            continue
        plan.claim.append(c.id)
        plan.in_flight_per_user[c.user_id] = plan.in_flight_per_user.get(c.user_id, 0) + 1
    return plan


def split_broken(rows: Iterable[tuple[int, object, object]]) -> tuple[list[int], list[tuple[int, str]]]:
    """Split ``(id, kind, payload)`` rows into handable ids and broken ``(id, reason)`` rows.

    A broken row is marked failed with the reason, so one corrupt row never
    blocks a world's queue.
    """
    ok: list[int] = []
    broken: list[tuple[int, str]] = []
    for rid, kind, payload in rows:
        problem = row_problem(kind, payload)
        if problem is None:
            ok.append(rid)
        else:
            broken.append((rid, problem))
    return ok, broken


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What a failed hand-off does to a request."""

    attempts: int
    failed: bool  # out of attempts: terminal ``failed``
    not_before: float | None  # world time before which it is not claimed again


def backoff_seconds(attempts: int, base_seconds: float) -> float:
    """Real seconds to wait after the ``attempts``-th failure: ``base × 2^(attempts−1)``, capped."""
    if base_seconds <= 0 or attempts <= 0:
        return 0.0
    return min(base_seconds * 2.0 ** min(attempts - 1, 32), MAX_BACKOFF_SECONDS)


def retry_after_failure(
    attempts_before: int,
    *,
    max_attempts: int,
    backoff_base_seconds: float,
    time_scale: float,
    world_time: float,
) -> RetryDecision:
    """Decide a failed hand-off: back to ``pending`` after a backoff, or ``failed``.

    The backoff is in real seconds converted to game seconds at the world's
    ``timeScale``: the world clock is the only clock a tick sees, and it
    advances at that rate while the world runs.
    """
    attempts = attempts_before + 1
    if attempts >= max_attempts:
        return RetryDecision(attempts, True, None)
    delay_game = backoff_seconds(attempts, backoff_base_seconds) * time_scale
    return RetryDecision(attempts, False, world_time + delay_game)


def truncate_error(error: str) -> str:
    """Keep stored error texts bounded."""
    return error if len(error) <= MAX_ERROR_LENGTH else error[: MAX_ERROR_LENGTH - 1] + "…"
