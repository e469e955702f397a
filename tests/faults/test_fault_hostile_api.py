"""Fault 6: hostile input against the admin API of the real daemon: no 5xx, nothing written on rejection.

The daemon runs as a subprocess with its HTTP server and an admin token. Two
sources of hostile requests:

* schemathesis over the daemon's own ``/openapi.json`` (the generator and
  checks of ``tests/support/api_fuzz.py``, shared with ``test_api_schemathesis.py``),
  positive and negative cases for every operation;
* hand-written cases: huge and chunked bodies, deep nesting, NaN/Infinity,
  wrong content types, path ids out of range / negative / huge / not numbers,
  missing and wrong tokens.

"Nothing written" is checked in the database: every table the API can reach
(worlds, world states, NPCs, sessions, generation requests, chains,
cooldowns) is read before and after each request, and a rejected request
(4xx) must leave them identical. That needs a database nobody else writes
to while a request runs: the worlds are paused (a paused world's tick writes
nothing), and an accepted write is undone through the API and waited out
before the next case. Accepted writes must be visible in the database (so
the comparison can see a write at all).

Token timing: ``hmac.compare_digest`` is constant-time by construction; a
nanosecond difference cannot be measured through HTTP on a shared 2-core
machine. What can leak through HTTP is a gross difference (a compare that
stops early and does per-character work, a lookup for a matching prefix):
interleaved pairs of wrong tokens (first vs last character wrong) must not
differ by a millisecond in median, which is far above the noise of a median
of paired differences and far below such a leak.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from scheduler_daemon.simulation.npc import Tier
from tests.faults.harness import (
    FaultDatabase,
    daemon_env,
    poll,
    profile,
    record_result,
    running_daemon,
    seed_requests,
    seed_worlds,
    write_config,
)
from tests.support.api_fuzz import fuzz_admin_api

pytestmark = pytest.mark.subprocess

TOKEN = "fault-token-7c1d9e2b4a6f80355e1c"
WORLD: dict[str, Any] = {
    "pauseSimulation": True,
    "timeScale": 60.0,
    "tickIntervalSeconds": 0.2,
    "maxCatchUpSeconds": 30.0,
    "generation": {"maxInFlightPerWorld": 1000, "maxInFlightPerUser": 1000},
}
NPCS = {Tier.DETAILED: 2, Tier.ACTIVE: 2}
#: The tables the admin API can write, directly or through a forced tick. Lease
#: columns of world_states are left out: the daemon renews them in the background.
SNAPSHOT = {
    "worlds": "SELECT id, name, meta, config_version, updated_at FROM worlds ORDER BY id",
    "world_states": "SELECT world_id, world_time, ticks, last_advanced_at FROM world_states ORDER BY world_id",
    "npcs": "SELECT * FROM npcs ORDER BY id",
    "sessions": "SELECT * FROM sessions ORDER BY id",
    "generation_requests": "SELECT * FROM generation_requests ORDER BY id",
    "interaction_chains": "SELECT * FROM interaction_chains ORDER BY id",
    "interaction_cooldowns": "SELECT * FROM interaction_cooldowns ORDER BY 1, 2, 3, 4",
}
#: Interleaved pairs per token-timing sample, and the largest median difference allowed.
TIMING_PAIRS = 150
TIMING_LIMIT_SECONDS = 0.001

Snapshot = dict[str, list[str]]


def snapshot(db: FaultDatabase) -> Snapshot:
    """Every row of every table the API can write, as canonical JSON (JSON columns are dicts)."""
    with db.engine.connect() as conn:  # one connection: the snapshot runs around every request
        return {
            table: [json.dumps(list(r), sort_keys=True, default=str) for r in conn.execute(sa.text(sql))]
            for table, sql in SNAPSHOT.items()
        }


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    out = []
    for table in SNAPSHOT:
        old, new = set(before[table]), set(after[table])
        out += [f"{table}: - {row}" for row in sorted(old - new)[:3]]
        out += [f"{table}: + {row}" for row in sorted(new - old)[:3]]
    return out


def patch_to(current: Any, target: Any) -> Any:
    """The JSON merge patch (RFC 7396) that turns ``current`` into ``target``."""
    if not isinstance(current, Mapping) or not isinstance(target, Mapping):
        return target
    patch: dict[str, Any] = {k: None for k in current if k not in target}
    for key, value in target.items():
        if key not in current or current[key] != value:
            patch[key] = patch_to(current.get(key), value)
    return patch


class Api:
    """The daemon's admin API plus the database, with the bookkeeping of the no-write check."""

    def __init__(self, db: FaultDatabase, port: int, worlds: list[int]) -> None:
        self.db = db
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.worlds = worlds
        #: A request a worker could complete (running): what a let-in completion would write.
        self.completable = int(db.execute("SELECT min(id) FROM generation_requests WHERE status = 'running'")[0][0])
        self.baseline = {w: self.simulation(w) for w in worlds}
        self.rejected = self.accepted = self.restores = 0
        self.violations: list[str] = []
        self.statuses: dict[int, int] = {}

    def simulation(self, world_id: int) -> Any:
        meta = self.db.execute("SELECT meta FROM worlds WHERE id = :w", {"w": world_id})[0][0]
        return (json.loads(meta) if isinstance(meta, str) else meta)["simulation"]

    def auth(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def observe(self, what: str, status: int, before: Snapshot) -> Snapshot:
        """Record one answer; a rejection must have written nothing. Returns the snapshot after."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        after = snapshot(self.db)
        if status >= 500:
            self.violations.append(f"{what}: answered {status}")
        elif status >= 400:
            self.rejected += 1
            changed = diff(before, after)
            if changed:
                self.violations.append(f"{what}: rejected with {status} but wrote: " + "; ".join(changed))
        else:
            self.accepted += 1
        return after

    def send(self, what: str, method: str, path: str, *, expect: range | set[int], **kwargs: Any) -> httpx.Response:
        before = snapshot(self.db)
        response = self.client.request(method, path, **kwargs)
        after = self.observe(what, response.status_code, before)
        if response.status_code not in expect:
            self.violations.append(f"{what}: answered {response.status_code}, expected {expect}: {response.text[:200]}")
        if response.status_code < 400 and after != before:
            self.restore()
        return response

    def send_raw(self, what: str, request: bytes, *, expect: set[int]) -> None:
        """A request httpx would refuse to send (e.g. a lying Content-Length), over a bare socket."""
        before = snapshot(self.db)
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(request)
            head = sock.recv(4096).split(b"\r\n", 1)[0]  # b"HTTP/1.1 413 Request Entity Too Large"
        status = int(head.split()[1])
        self.observe(what, status, before)
        if status not in expect:
            self.violations.append(f"{what}: answered {status}, expected {expect}")

    def restore(self) -> None:
        """Undo accepted writes through the API (so the daemon applies them at once) and wait them out."""
        self.restores += 1
        for world_id in self.worlds:
            patch = patch_to(self.simulation(world_id), self.baseline[world_id])
            if patch:
                r = self.client.put(f"/api/v1/worlds/{world_id}/scheduler/config", json=patch, headers=self.auth())
                assert r.status_code == 200, r.text
        self.settle()

    def settle(self) -> None:
        """Every world registered again and the database quiet (a resumed world's carried time is written)."""

        def quiet() -> bool:
            listed = self.client.get("/api/v1/worlds", headers=self.auth()).json()["worlds"]
            running = {w["worldId"] for w in listed if not w["isolated"]}
            if not set(self.worlds) <= running:
                return False
            first = snapshot(self.db)
            time.sleep(3 * WORLD["tickIntervalSeconds"])  # longer than a tick interval: a pending write shows
            return snapshot(self.db) == first

        poll(quiet, timeout=30, interval=0.1, what="the worlds to be registered and the database quiet")


@pytest.fixture
def api(fault_db: FaultDatabase, tmp_path: Path) -> Iterator[Api]:
    db = fault_db
    worlds = seed_worlds(db, 3, simulation=WORLD, npcs_per_tier=NPCS)
    ids = seed_requests(db, worlds, 4)
    # Some requests a worker may complete (handed off, running), the rest pending (paused worlds claim nothing).
    db.execute(
        "UPDATE generation_requests SET status = 'enqueued', handed_off = true WHERE id IN (:a, :b)",
        {
            "a": ids[0],
            "b": ids[4],
        },
    )
    db.execute("UPDATE generation_requests SET status = 'running', handed_off = true WHERE id = :a", {"a": ids[1]})
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    config = write_config(
        tmp_path / "config.toml",
        http={"bind": "127.0.0.1", "port": 0, "admin_token_file": str(token_file)},
    )
    with running_daemon(config, daemon_env(db.url), tmp_path / "daemon.log") as daemon:
        api = Api(db, daemon.http_port(), worlds)
        try:
            api.settle()
            yield api
            assert daemon.alive(), daemon.log_tail()
        finally:
            api.client.close()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()


def test_schemathesis_never_errors_and_rejections_write_nothing(api: Api) -> None:
    examples = profile().schemathesis_examples
    started = time.monotonic()

    def around(case: Any, call: Any) -> None:
        before = snapshot(api.db)
        response = call()  # raises on a 5xx or a schema violation (tests/support/api_fuzz.py CHECKS)
        after = api.observe(f"{case.method} {case.path} {case.path_parameters}", response.status_code, before)
        if response.status_code < 400:
            _check_visible(api, case, response, before, after)
            if after != before:
                api.restore()

    sent = fuzz_admin_api(
        api.url, TOKEN, examples=examples, world_ids=(*api.worlds, max(api.worlds) + 1), around=around
    )
    record_result(
        "hostile-api-schemathesis",
        backend=api.db.backend,
        examples_per_operation=examples,
        requests=sent,
        rejected=api.rejected,
        accepted=api.accepted,
        restores=api.restores,
        statuses=api.statuses,
        violations=len(api.violations),
        seconds=round(time.monotonic() - started, 1),
    )
    assert api.rejected > 0 and api.accepted > 0
    assert api.violations == [], "\n".join(api.violations[:50])


def _check_visible(api: Api, case: Any, response: Any, before: Snapshot, after: Snapshot) -> None:
    """An accepted config change is in the database with the version its ETag names."""
    if case.method.upper() == "PUT" and case.path.endswith("/scheduler/config"):
        world_id = int(case.path_parameters["world_id"])
        version = api.db.execute("SELECT config_version FROM worlds WHERE id = :w", {"w": world_id})[0][0]
        etag = response.headers.get("etag")
        etag = etag[0] if isinstance(etag, list) else etag  # schemathesis keeps every value of a header
        if etag != f'"{version}"' or after == before:
            api.violations.append(
                f"PUT config of world {world_id} accepted (ETag {etag}) but the database "
                f"holds version {version}{' and did not change' if after == before else ''}"
            )


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def test_hand_written_hostile_requests_are_rejected_without_writes(api: Api) -> None:
    started = time.monotonic()
    w = api.worlds[0]
    config = f"/api/v1/worlds/{w}/scheduler/config"
    json_headers = {**api.auth(), "Content-Type": "application/json"}
    rejected = range(400, 500)

    # Accepted writes first: each must be visible, so the snapshot can see a write at all.
    r = api.send("valid config change", "PUT", config, json={"timeScale": 7.0}, headers=api.auth(), expect={200})
    assert r.status_code == 200
    r = api.send("resume", "POST", f"/api/v1/worlds/{w}/scheduler/resume", headers=api.auth(), expect={200})
    completed = api.db.execute("SELECT min(id) FROM generation_requests WHERE status = 'enqueued'")[0][0]
    r = api.send(
        "complete a handed-off request",
        "POST",
        f"/api/v1/generation/{completed}/complete",
        json={"status": "succeeded"},
        headers=api.auth(),
        expect={200},
    )
    status = api.db.execute("SELECT status FROM generation_requests WHERE id = :i", {"i": completed})[0][0]
    assert status == "succeeded", "an accepted completion is not in the database"
    # A forced tick of a running world commits a tick.
    api.client.post(f"/api/v1/worlds/{w}/scheduler/resume", headers=api.auth()).raise_for_status()
    ticks = api.db.ticks()[w]
    r = api.client.post(f"/api/v1/worlds/{w}/scheduler/tick", json={"deltaSeconds": 1.0}, headers=api.auth())
    assert r.status_code == 200, r.text
    assert api.db.ticks()[w] > ticks, "an accepted forced tick is not in the database"
    api.restore()

    valid_bodies: dict[str, tuple[str, dict[str, Any] | None]] = {
        "config": ("PUT", {"timeScale": 9.0}),
        "scheduler/pause": ("POST", None),
        "scheduler/resume": ("POST", None),
        "scheduler/tick": ("POST", {"deltaSeconds": 1.0}),
    }
    # Missing and wrong tokens, each with a request that would write if it were let in.
    writes = [
        ("PUT", config, {"timeScale": 9.0}),
        ("POST", f"/api/v1/worlds/{w}/scheduler/resume", None),
        ("POST", f"/api/v1/worlds/{w}/scheduler/tick", {"deltaSeconds": 1.0}),
        ("POST", f"/api/v1/generation/{api.completable}/complete", {"status": "failed"}),
    ]
    bad_auth: list[dict[str, str | bytes]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN.upper()}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Authorization": "Bearer \u00e9\u00e8".encode()},  # not ASCII (UTF-8 bytes on the wire)
        {"Authorization": b"Bearer \xff\xfe"},  # not even UTF-8
    ]
    for method, path, body in writes:
        for headers in bad_auth:
            api.send(
                f"{method} {path} with {str(headers)[:40]}", method, path, json=body, headers=headers, expect={401}
            )

    # Bodies: huge, chunked, deeply nested, NaN/Infinity, not JSON, wrong content types.
    huge = json.dumps({"timeScale": 2.0, "pad": "x" * (1 << 20)})

    def chunks() -> Iterator[bytes]:
        yield b'{"timeScale": 2.0, "pad": "'
        for _ in range(200):
            yield b"x" * 8192
        yield b'"}'

    body_cases: list[tuple[str, dict[str, Any]]] = [
        ("1 MiB body", {"content": huge, "headers": json_headers}),
        ("chunked 1.6 MiB body", {"content": chunks(), "headers": json_headers}),
        ("nesting 40 deep", {"content": _nested(40), "headers": json_headers}),
        ("nesting 20000 deep", {"content": "[" * 20_000 + "]" * 20_000, "headers": json_headers}),
        ("nested patch 20000 deep", {"content": _nested(20_000)[:60_000], "headers": json_headers}),
        ("NaN", {"content": '{"timeScale": NaN}', "headers": json_headers}),
        ("Infinity", {"content": '{"timeScale": Infinity}', "headers": json_headers}),
        ("-Infinity", {"content": '{"maxCatchUpSeconds": -Infinity}', "headers": json_headers}),
        ("NaN in an unknown key", {"content": '{"someKey": NaN}', "headers": json_headers}),
        ("1e999", {"content": '{"timeScale": 1e999}', "headers": json_headers}),
        ("timeScale 1e308", {"content": '{"timeScale": 1e308}', "headers": json_headers}),
        ("negative interval", {"content": '{"tickIntervalSeconds": -1}', "headers": json_headers}),
        ("not JSON", {"content": '{"timeScale": 2.0', "headers": json_headers}),
        ("not UTF-8", {"content": b'{"timeScale": "\xff\xfe"}', "headers": json_headers}),
        ("NUL in a string", {"content": '{"x": "a\\u0000b"}', "headers": json_headers}),
        ("lone surrogate", {"content": '{"x": "\\ud800"}', "headers": json_headers}),
        ("JSON array", {"content": "[1, 2]", "headers": json_headers}),
        ("JSON null", {"content": "null", "headers": json_headers}),
        ("empty body", {"content": b"", "headers": json_headers}),
        ("form body", {"data": {"timeScale": "2"}, "headers": api.auth()}),
        ("multipart body", {"files": {"timeScale": ("x.json", b'{"timeScale": 2}')}, "headers": api.auth()}),
        ("XML body", {"content": "<timeScale>2</timeScale>", "headers": {**api.auth(), "Content-Type": "text/xml"}}),
        (
            "JSON as text/plain",
            {"content": '{"timeScale": 2.0}', "headers": {**api.auth(), "Content-Type": "text/plain"}},
        ),
    ]
    for what, kwargs in body_cases:
        api.send(f"PUT config: {what}", "PUT", config, expect=rejected, **kwargs)
    # A Content-Length announcing 1 GiB (then 2 bytes): refused from the header, without waiting for the body.
    api.send_raw(
        "PUT config: Content-Length 1 GiB",
        f"PUT {config} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n{{}}".encode(),
        expect={413},
    )
    for what, content in [
        ("NaN", '{"deltaSeconds": NaN}'),
        ("Infinity", '{"deltaSeconds": Infinity}'),
        ("negative", '{"deltaSeconds": -1}'),
        ("above maxCatchUpSeconds", '{"deltaSeconds": 1e9}'),
        ("extra key", '{"deltaSeconds": 1, "worldTime": 5}'),
        ("null", '{"deltaSeconds": null}'),
        ("boolean", '{"deltaSeconds": true}'),
        ("numeric string", '{"deltaSeconds": "1"}'),
    ]:
        path = f"/api/v1/worlds/{w}/scheduler/tick"
        api.send(f"tick: {what}", "POST", path, content=content, headers=json_headers, expect=rejected)
    complete = f"/api/v1/generation/{api.completable}/complete"
    for what, text in [
        ("unknown status", '{"status": "done"}'),
        ("error too long", json.dumps({"status": "failed", "error": "e" * 5000})),
        ("extra key", '{"status": "failed", "attempts": 0}'),
    ]:
        api.send(f"complete: {what}", "POST", complete, content=text, headers=json_headers, expect=rejected)
    pending = api.db.execute("SELECT min(id) FROM generation_requests WHERE status = 'pending'")[0][0]
    path = f"/api/v1/generation/{pending}/complete"
    api.send("complete a pending request", "POST", path, json={"status": "succeeded"}, headers=api.auth(), expect={409})

    # Path ids out of range, negative, huge, not numbers, and unknown: with bodies that would be accepted.
    bad_ids = ["0", "-1", str(2**31), str(2**63), str(10**30), "abc", "1.5", "1e3", "%00", "999999"]
    for world_id in bad_ids:
        for suffix, (method, body) in valid_bodies.items():
            path = f"/api/v1/worlds/{world_id}/scheduler/{suffix.removeprefix('scheduler/')}"
            api.send(f"{method} {path}", method, path, json=body, headers=api.auth(), expect=rejected)
        path = f"/api/v1/worlds/{world_id}/scheduler/stats"
        api.send(f"GET {path}", "GET", path, headers=api.auth(), expect=rejected)
    for request_id in ["0", "-1", str(2**63), str(10**30), "abc", "999999"]:
        path = f"/api/v1/generation/{request_id}/complete"
        api.send(f"POST {path}", "POST", path, json={"status": "failed"}, headers=api.auth(), expect=rejected)

    timing = _token_timing(api)
    record_result(
        "hostile-api-hand-written",
        backend=api.db.backend,
        rejected=api.rejected,
        accepted=api.accepted,
        statuses=api.statuses,
        violations=len(api.violations),
        token_timing_median_diff_ms=round(timing * 1000, 4),
        seconds=round(time.monotonic() - started, 1),
    )
    assert api.violations == [], "\n".join(api.violations[:50])
    assert abs(timing) < TIMING_LIMIT_SECONDS, (
        f"a token wrong in its last character is answered {timing * 1000:.3f} ms (median) slower than one wrong "
        "in its first: the token compare leaks how much of the token matched"
    )


def _token_timing(api: Api) -> float:
    """Median of paired (last-char-wrong − first-char-wrong) 401 latencies, pairs interleaved in random order."""
    rng = random.Random(9)
    first_wrong = ("X" if TOKEN[0] != "X" else "Y") + TOKEN[1:]
    last_wrong = TOKEN[:-1] + ("X" if TOKEN[-1] != "X" else "Y")
    path = f"/api/v1/worlds/{api.worlds[0]}/scheduler/stats"

    def once(token: str) -> float:
        start = time.perf_counter()
        status = api.client.get(path, headers=api.auth(token)).status_code
        elapsed = time.perf_counter() - start
        assert status == 401
        return elapsed

    for _ in range(20):  # warm up connections and code paths
        once(first_wrong)
    diffs = []
    for _ in range(TIMING_PAIRS):
        if rng.random() < 0.5:
            a = once(first_wrong)
            b = once(last_wrong)
        else:
            b = once(last_wrong)
            a = once(first_wrong)
        diffs.append(b - a)
    return statistics.median(diffs)
