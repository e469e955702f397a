"""A database migrated by a newer scheduler-daemon (a rolled-back package): said as such, never a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler_daemon import cli
from scheduler_daemon.exits import EXIT_NOT_MIGRATED
from scheduler_daemon.store.errors import SchemaNotMigratedError
from scheduler_daemon.store.migrate import head_revisions
from scheduler_daemon.store.repository import Store

HEADS = ", ".join(sorted(head_revisions()))


@pytest.fixture
def scratch_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database of this test's own: its schema version is changed."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ahead.db'}"
    return str(request.getfixturevalue("pg_scratch_url"))


EXPECTED = (
    f"database schema is at revision 9999, which this version of scheduler-daemon does not know "
    f"(its latest is {HEADS}): a newer version migrated it; run that version, or restore the "
    "database from before"
)


async def _migrated_by_a_newer_version(url: str) -> None:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        async with store.transaction() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(SchemaNotMigratedError) as info:
            await store.check_schema()
        assert str(info.value) == EXPECTED
        with pytest.raises(SchemaNotMigratedError) as info:
            await store.upgrade()
        assert str(info.value) == EXPECTED
    finally:
        await store.dispose()


def test_a_schema_newer_than_the_package_is_named_not_upgraded(
    scratch_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_migrated_by_a_newer_version(scratch_url))
    monkeypatch.setenv("SCHEDULER_DATABASE__URL", scratch_url)
    capsys.readouterr()
    assert cli.main(["db", "upgrade"]) == EXIT_NOT_MIGRATED
    assert capsys.readouterr().err == f"scheduler-daemon: error: {EXPECTED}\n"
