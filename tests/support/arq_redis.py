"""Redis for the ARQ sink's tests: a namespace per test on the shared server, a server of a test's own, a worker.

Every test gets its own queue and job id prefix (:class:`ArqNamespace`), so
tests never see each other's jobs on the shared Redis, and deletes its keys
afterwards. :class:`RedisServer` is a throwaway ``redis-server`` on a free
port that a test stops and starts (a Redis outage); :func:`start_worker` runs
:mod:`tests.support.arq_worker` as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ArqNamespace:
    """One test's queue and job id prefix on a Redis database."""

    redis_url: str
    queue_name: str = field(default_factory=lambda: f"test-arq-sink:{uuid.uuid4().hex[:12]}")
    job_id_prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}:")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=10)

    def job_id(self, request_id: int) -> str:
        return f"{self.job_id_prefix}generation-request-{request_id}"

    def queued(self) -> int:
        """Jobs waiting on this test's queue."""
        with self.client() as r:
            return int(r.zcard(self.queue_name))

    def finished(self, request_id: int) -> bool:
        """ARQ is done with the request's job: its result is stored and its job key gone.

        A request reads ``succeeded`` as soon as the job has reported, a moment
        before the worker stores the result; a worker stopped in that moment
        cancels the job and leaves it queued to run again.
        """
        job_id = self.job_id(request_id)
        with self.client() as r:
            return bool(r.exists(f"arq:result:{job_id}")) and not r.exists(f"arq:job:{job_id}")

    def job_keys(self) -> list[str]:
        """This test's ARQ keys (``arq:job:``, ``arq:result:``, ``arq:retry:``, ``arq:in-progress:``)."""
        with self.client() as r:
            return sorted(k.decode() for k in r.scan_iter(match=f"arq:*:{self.job_id_prefix}*", count=1000))

    def cleanup(self) -> None:
        try:
            with self.client() as r:
                keys = [*r.scan_iter(match=f"arq:*:{self.job_id_prefix}*", count=1000)]
                r.delete(self.queue_name, f"{self.queue_name}:health-check", *keys)
        except redis.RedisError:
            pass  # a test's own server that is already gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of the test's own on a fixed free port, keeping nothing on disk."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("redis-server is not installed but CI=true (.ci/run installs it)")
            pytest.skip("needs redis-server (Debian package redis-server) to simulate a Redis outage")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        with (self.workdir / f"redis-{self.port}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                cwd=self.workdir,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=1) as r:
                    if r.ping():
                        return
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_worker(
    namespace: ArqNamespace, *, daemon_url: str, token: str, runs: Path, log: Path
) -> subprocess.Popen[bytes]:
    """The real ARQ worker of :mod:`tests.support.arq_worker` on the test's queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env.update(
        ARQ_TEST_REDIS_URL=namespace.redis_url,
        ARQ_TEST_QUEUE=namespace.queue_name,
        ARQ_TEST_DAEMON_URL=daemon_url,
        ARQ_TEST_TOKEN=token,
        ARQ_TEST_RUNS_FILE=str(runs),
        PYTHONPATH=str(ROOT),
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.arq_worker"], env=env, stdout=out, stderr=out, cwd=ROOT
        )


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> int:
    """Send ``sig`` (if it still runs) and wait for the exit; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
