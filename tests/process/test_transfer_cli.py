"""`scheduler-daemon import`/`export` as a user runs them: subprocesses, exit codes, stdin/stdout, the progress bar.

What the files do to the database is tested in-process in ``tests/store/test_transfer.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler_daemon.store.repository import Store
from tests.conftest import create_pg_database, drop_pg_database, require_postgres_url
from tests.process.test_daemon_world_time import ROOT
from tests.store.test_transfer import counts, seed_source, without_daemon_ids, worlds_of
from tests.support.cluster import Cluster, poll
from tests.support.terminal import run_on_pty

pytestmark = pytest.mark.subprocess

GOOD = {"externalId": "good", "name": "Good", "npcs": [{"externalId": "a", "name": "A"}]}
BAD_FIELD = {"externalId": "bad", "name": "Bad", "npcs": [{"name": "x", "energy": "high"}]}


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env.update(SCHEDULER_DATABASE__URL=url, PYTHONPATH=str(ROOT))
    return env


def cli(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", *args],
        env=env_for(url),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
async def target_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A second migrated, empty database on the same backend."""
    if backend == "sqlite":
        url, drop = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}", None
    else:
        url = drop = create_pg_database(require_postgres_url(), prefix="sched_transfer")
    target = Store.from_url(url)
    await target.upgrade()
    await target.dispose()
    yield url
    if drop is not None:
        drop_pg_database(drop)


async def test_import_reports_each_bad_world_imports_the_rest_and_exits_7(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "worlds.ndjson"
    path.write_text("\n".join([json.dumps(GOOD), "oops", json.dumps(BAD_FIELD)]) + "\n")
    proc = cli(db_url, "import", str(path))
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.splitlines() == [
        "line 2: worlds[1]: not valid JSON: Expecting value (column 1)",
        "line 3: worlds[2].npcs[0].energy: Input should be a valid number",
    ]
    assert proc.stdout.splitlines() == [
        "imported:",
        "  worlds:   1 created, 0 updated, 2 failed",
        "  NPCs:     1 created, 0 updated",
        "  sessions: 0 created, 0 updated, 0 closed",
    ]
    assert await counts(store) == {"worlds": 1, "world_states": 1, "npcs": 1, "sessions": 0}

    # Again, as JSON: the good world is updated, the failures are listed with line and path.
    proc = cli(db_url, "import", "--json", str(path))
    assert proc.returncode == 7
    summary = json.loads(proc.stdout)
    assert summary["worlds"] == {"created": 0, "updated": 1, "failed": 2}
    assert summary["failures"][1] == {
        "line": 3,
        "index": 2,
        "externalId": "bad",
        "problems": ["worlds[2].npcs[0].energy: Input should be a valid number"],
    }
    assert await counts(store) == {"worlds": 1, "world_states": 1, "npcs": 1, "sessions": 0}

    path.write_text(json.dumps(GOOD) + "\n")
    proc = cli(db_url, "import", str(path))
    assert (proc.returncode, proc.stderr) == (0, "")


async def test_export_to_stdout_imports_from_stdin_into_an_empty_database(
    store: Store, db_url: str, target_url: str, tmp_path: Path
) -> None:
    await seed_source(store)
    exported = cli(db_url, "export")
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == "exported 2 worlds, 6 NPCs, 2 sessions to stdout (json)\n"
    imported = cli(target_url, "import", "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert "  worlds:   2 created, 0 updated, 0 failed" in imported.stdout

    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli(db_url, "export", "-o", str(out_a)).returncode == 0
    assert cli(target_url, "export", "-o", str(out_b), "--world", "ext:harbor", "--world", "2").returncode == 0
    a, b = worlds_of(out_a.read_text(), "ndjson"), worlds_of(out_b.read_text(), "ndjson")  # type: ignore[arg-type]
    assert without_daemon_ids(b) == without_daemon_ids(a)


async def test_dry_run_reports_the_same_summary_and_commits_nothing(store: Store, db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "worlds.json"
    path.write_text(json.dumps({"worlds": [GOOD, BAD_FIELD, {**GOOD, "externalId": "other"}]}, indent=2))
    dry = cli(db_url, "import", "--dry-run", "--json", str(path))
    assert dry.returncode == 7
    assert await counts(store) == {"worlds": 0, "world_states": 0, "npcs": 0, "sessions": 0}
    real = cli(db_url, "import", "--json", str(path))
    assert (real.returncode, real.stderr) == (7, dry.stderr)
    assert json.loads(dry.stdout) == {**json.loads(real.stdout), "dryRun": True}
    assert await counts(store) == {"worlds": 2, "world_states": 2, "npcs": 2, "sessions": 0}
    text = cli(db_url, "import", "--dry-run", str(path)).stdout
    assert text.startswith("dry run (every world rolled back, nothing committed):\n  worlds:   0 created, 2 updated")


def _run_on_pty(url: str, *args: str) -> tuple[int, str]:
    return run_on_pty(list(args), env_for(url), ROOT)


async def test_progress_bar_only_on_a_terminal(store: Store, db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "worlds.ndjson"
    path.write_text("".join(json.dumps({**GOOD, "externalId": f"w{i}"}) + "\n" for i in range(5)) + "oops\n")
    code, terminal = _run_on_pty(db_url, "import", str(path))
    assert code == 7
    # Drawn in place, finished at 100 %, and the bad line's message is on a line of its own.
    assert "\r" in terminal
    assert "importing 100% [##############################] 5 worlds, 5 NPCs, 1 failed" in terminal
    assert "\nline 6: worlds[5]: not valid JSON" in "\n" + terminal.replace("\r", "\n")
    code, quiet = _run_on_pty(db_url, "import", "--quiet", str(path))
    assert (code, quiet.replace("\r\n", "\n")) == (7, "line 6: worlds[5]: not valid JSON: Expecting value (column 1)\n")
    piped = cli(db_url, "import", str(path))
    assert piped.stderr == "line 6: worlds[5]: not valid JSON: Expecting value (column 1)\n"


async def test_unusable_files_and_references_exit_with_one_line(store: Store, db_url: str, tmp_path: Path) -> None:
    proc = cli(db_url, "import", str(tmp_path / "missing.json"))
    assert (proc.returncode, proc.stderr) == (
        2,
        f"scheduler-daemon: error: {tmp_path / 'missing.json'}: No such file or directory\n",
    )

    broken = tmp_path / "broken.json"  # a JSON document cut short: nothing of it is imported
    broken.write_text('{"worlds": [\n' + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:-5] + "\n")
    proc = cli(db_url, "import", str(broken))
    assert (proc.returncode, proc.stderr) == (
        7,
        f"scheduler-daemon: error: {broken}: line 3 column 78: not valid JSON: Invalid control character\n",
    )
    assert await counts(store) == {"worlds": 0, "world_states": 0, "npcs": 0, "sessions": 0}

    out = tmp_path / "out"
    out.mkdir()
    proc = cli(db_url, "export", "--world", "ext:nope", "-o", str(out / "x.json"))
    assert (proc.returncode, proc.stderr) == (
        1,
        "scheduler-daemon: error: --world ext:nope: world ext:nope does not exist\n",
    )
    assert list(out.iterdir()) == []  # no output file, not even a temporary one
    proc = cli(db_url, "export", "--world", "0")
    assert proc.returncode == 1
    assert "expected a daemon id" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.postgres
def test_a_running_daemon_ticks_an_imported_world_through_change_notifications(
    tmp_path: Path, pg_database_url: str
) -> None:
    # Discovery polls once a minute: only the NOTIFY of the import's commit can make the daemon act sooner.
    cluster = Cluster(pg_database_url, tmp_path, ttl=6.0, discovery=60.0)
    try:
        cluster.reset(1)
        started = time.monotonic()
        cluster.start("a")
        poll(
            lambda: any(e.get("event") == "change_notifications_listening" for e in cluster.log_events("a")),
            timeout=60,
            what="the daemon to listen",
        )
        world = {
            "externalId": "imported",
            "name": "Imported",
            "simulation": {"alwaysOn": True, "tickIntervalSeconds": 0.5, "timeScale": 60},
            "npcs": [{"externalId": f"n{i}", "name": f"N{i}", "home": "h"} for i in range(3)],
        }
        path = tmp_path / "world.ndjson"
        path.write_text(json.dumps(world) + "\n")
        assert cli(pg_database_url, "import", str(path)).returncode == 0
        with cluster.engine.connect() as conn:
            world_id = conn.execute(sa.text("SELECT id FROM worlds WHERE external_id = 'imported'")).scalar_one()
        poll(lambda: cluster.world_ticks().get(world_id), timeout=20, what="the imported world's first tick")

        def tier_of_n1() -> int:
            with cluster.engine.connect() as conn:
                query = sa.text("SELECT tier FROM npcs WHERE world_id = :w AND external_id = 'n1'")
                return int(conn.execute(query, {"w": world_id}).scalar_one())

        # A second import opens a player's session on n1: the daemon promotes it (tier 0, detailed).
        session = {"externalId": "s", "userId": "player", "sceneNpcIds": ["n1"]}
        path.write_text(json.dumps({**world, "sessions": [session]}) + "\n")
        assert cli(pg_database_url, "import", str(path)).returncode == 0
        poll(lambda: tier_of_n1() == 0, timeout=20, what="the session's NPC to be detailed")
        assert time.monotonic() - started < 60.0, "too slow to rule out the daemon's second discovery poll"
        assert cluster.stop_all() == {"a": 0}
    finally:
        cluster.close()


async def test_output_closed_by_its_reader_ends_without_a_traceback(store: Store, db_url: str, tmp_path: Path) -> None:
    # `import … | head -1`: the summary could not be printed, a traceback was (the import itself was done).
    path = tmp_path / "worlds.ndjson"
    path.write_text(json.dumps(GOOD) + "\n")
    for args, code, stderr in (
        (("import", str(path)), 0, ""),
        (("import", "--json", str(path)), 0, ""),
        (("export",), 1, "scheduler-daemon: error: the output was closed before the export ended\n"),
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler_daemon", *args],
            env=env_for(db_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before anything is written
        assert (proc.wait(timeout=120), proc.stderr.read()) == (code, stderr), args
        proc.stderr.close()
    assert await counts(store) == {"worlds": 1, "world_states": 1, "npcs": 1, "sessions": 0}
