"""Fixtures of the fault suite: a database of its own per test, migrated, audited."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import create_pg_database, drop_pg_database, require_postgres_url
from tests.faults.audit import install_audit
from tests.faults.harness import FaultDatabase

pytestmark = pytest.mark.subprocess


def _make(backend: str, tmp_path: Path) -> Iterator[FaultDatabase]:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'fault.db'}"
    else:
        url = create_pg_database(require_postgres_url(), prefix="sched_fault")
    db = FaultDatabase(url, backend)
    try:
        db.run(lambda store: store.upgrade())
        install_audit(db)
        yield db
    finally:
        db.dispose()
        if backend == "postgres" and not os.environ.get("SCHEDULER_FAULTS_KEEP_DB"):
            drop_pg_database(url)


@pytest.fixture
def fault_db(backend: str, tmp_path: Path) -> Iterator[FaultDatabase]:
    """A fresh migrated database with the audit triggers, on each backend."""
    yield from _make(backend, tmp_path)


@pytest.fixture
def pg_fault_db(tmp_path: Path) -> Iterator[FaultDatabase]:
    """The same, PostgreSQL only (faults that only exist there)."""
    yield from _make("postgres", tmp_path)
