"""The command line as a person and a script see it: progress on a terminal only, closed pipes, database errors.

Subprocesses with a real pseudo-terminal (``os.openpty``) or a real pipe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scheduler_daemon.settings import DEFAULT_CONFIG_PATH, DatabaseSettings
from scheduler_daemon.store.migrate import head_revisions
from scheduler_daemon.store.repository import Store
from tests.process.test_daemon_world_time import ROOT
from tests.process.test_transfer_cli import env_for
from tests.store.test_jobs_cli import _seed
from tests.support.terminal import run_into_closed_pipe, run_on_pty

pytestmark = pytest.mark.subprocess

HEADS = ", ".join(sorted(head_revisions()))


def cli(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler_daemon", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def fresh_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database, not migrated."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    return str(request.getfixturevalue("pg_scratch_url"))


def test_db_upgrade_shows_progress_on_a_terminal_and_always_says_from_where_to_where(fresh_url: str) -> None:
    env = env_for(fresh_url)
    code, terminal = run_on_pty(["db", "upgrade"], env, ROOT)
    assert code == 0
    first = re.search(r"migration 1/(\d+)", terminal)
    assert first is not None, terminal
    total = first[1]
    # The bar is redrawn in place and ends at the last migration, on stderr only.
    assert "\r" in terminal and re.search(rf"upgrading schema: migration {total}/{total} \({HEADS}\)", terminal)

    # Already current, piped: no bar, and the one line of result on stdout.
    piped = cli(env, "db", "upgrade")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, f"schema already at {HEADS}\n", "")
    code, quiet = run_on_pty(["db", "upgrade", "--quiet"], env, ROOT)
    assert (code, quiet) == (0, "")


def test_db_upgrade_prints_its_result_when_not_on_a_terminal(tmp_path: Path) -> None:
    proc = cli(env_for(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"), "db", "upgrade")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"schema upgraded: (empty) -> {HEADS}\n", "")


async def test_simulate_shows_progress_on_a_terminal_only(store: Store, db_url: str) -> None:
    env = env_for(db_url)
    assert cli(env, "demo").returncode == 0
    simulate = ["simulate", "--world", "1", "--game-hours", "2", "--dry-run"]
    code, terminal = run_on_pty(simulate, env, ROOT)
    assert code == 0, terminal
    assert re.search(r"simulating 100% \[#{30}\] 2\.0/2 game hours, \d+ ticks", terminal), terminal
    code, quiet = run_on_pty([*simulate, "--quiet"], env, ROOT)
    assert (code, quiet) == (0, "")
    piped = cli(env, *simulate)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.startswith("World 1")


# Every command that writes to stdout, listings first (with and without --json).
PIPED_COMMANDS = [
    ["worlds", "list"],
    ["worlds", "list", "--json"],
    ["jobs", "list"],
    ["jobs", "list", "--json"],
    ["chains", "list"],
    ["chains", "list", "--json"],
    ["worlds", "show", "1"],
    ["db", "check"],
    ["db", "upgrade"],
    ["demo"],
    ["simulate", "--world", "1", "--game-hours", "0.1", "--dry-run"],
    ["simulate", "--world", "1", "--game-hours", "0.1", "--dry-run", "--json"],
    ["check-config", str(ROOT / "config.example.toml")],
]


async def test_no_traceback_when_the_reader_closes_the_pipe(db_url: str) -> None:
    await _seed(db_url)  # world 1 with a generation request and a chain: every listing has rows
    env = env_for(db_url)
    writers = [args for args in PIPED_COMMANDS if args[0] in ("db", "demo") and args != ["db", "check"]]
    readers = [args for args in PIPED_COMMANDS if args not in writers]
    procs = [run_into_closed_pipe(args, env, ROOT) for args in writers]
    # The readers side by side: each is its own process, and nothing writes meanwhile.
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs += pool.map(lambda args: run_into_closed_pipe(args, env, ROOT), [*readers, ["--version"]])
    for args, proc in zip([*writers, *readers], procs, strict=False):
        assert (proc.returncode, proc.stderr) == (1, ""), args
    # argparse ignores a failed write of --help and --version itself.
    version = procs[-1]
    assert (version.returncode, version.stderr) == (0, "")
    export = run_into_closed_pipe(["export"], env, ROOT)
    assert (export.returncode, export.stderr) == (
        1,
        "scheduler-daemon: error: the output was closed before the export ended\n",
    )


async def test_a_shell_pipeline_closing_early_ends_quietly(db_url: str) -> None:
    await _seed(db_url)
    proc = subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -m scheduler_daemon jobs list | head -1"],
        env=env_for(db_url),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert (proc.returncode, proc.stdout.split()[:2], proc.stderr) == (0, ["ID", "WORLD"], "")


# ----------------------------------------------------------- database errors
def test_a_sqlite_file_that_cannot_be_opened_is_named_with_where_its_url_came_from(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "scheduler.db"
    env = env_for(f"sqlite+aiosqlite:///{missing}")
    proc = cli(env, "jobs", "list")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        3,
        "",
        f"scheduler-daemon: error: cannot open the database: SQLite file {missing} "
        f"(from SCHEDULER_DATABASE__URL): its directory {missing.parent} does not exist\n",
    )
    assert not (tmp_path / "no").exists()

    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite+aiosqlite:///{missing}"\n')
    no_url = {k: v for k, v in env.items() if k != "SCHEDULER_DATABASE__URL"}
    proc = cli(no_url, "--config", str(config), "db", "upgrade")
    assert (proc.returncode, proc.stderr) == (
        3,
        f"scheduler-daemon: error: cannot open the database: SQLite file {missing} "
        f"(database.url in {config}): its directory {missing.parent} does not exist\n",
    )

    (tmp_path / "a-directory").mkdir()
    proc = cli(env_for(f"sqlite+aiosqlite:///{tmp_path / 'a-directory'}"), "worlds", "list")
    assert proc.returncode == 3
    assert proc.stderr.endswith(f"(from SCHEDULER_DATABASE__URL): {tmp_path / 'a-directory'} is a directory\n")


def test_the_default_sqlite_url_says_it_is_the_default(tmp_path: Path) -> None:
    default = Path(DatabaseSettings().url.removeprefix("sqlite+aiosqlite:///"))
    if default.parent.exists() or DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{default.parent} or {DEFAULT_CONFIG_PATH} exists on this machine")
    env = {k: v for k, v in env_for("unused").items() if k != "SCHEDULER_DATABASE__URL"}
    proc = cli(env, "worlds", "list")
    assert (proc.returncode, proc.stderr) == (
        3,
        f"scheduler-daemon: error: cannot open the database: SQLite file {default} (the default database.url; "
        f"set it in {DEFAULT_CONFIG_PATH} or SCHEDULER_DATABASE__URL): its directory {default.parent} does not exist\n",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens files regardless of their mode")
def test_a_sqlite_file_without_permission_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = cli(env_for(f"sqlite+aiosqlite:///{locked / 'scheduler.db'}"), "worlds", "list")
    assert proc.returncode == 3
    assert proc.stderr.endswith(f": no permission to create a file in {locked}\n")


def test_an_unreachable_postgresql_is_named_without_its_password() -> None:
    proc = cli(env_for("postgresql+psycopg://nobody:s3cret@127.0.0.1:1/nothing"), "jobs", "list")
    assert proc.returncode == 3
    assert proc.stderr.startswith(
        "scheduler-daemon: error: cannot open the database: PostgreSQL database nothing on 127.0.0.1:1 "
        "as user nobody (from SCHEDULER_DATABASE__URL): OperationalError: "
    ), proc.stderr
    assert "s3cret" not in proc.stderr and len(proc.stderr.splitlines()) == 1

    # The password in the query string (libpq takes it there too); the daemon's log names the URL.
    env = env_for("postgresql+psycopg://nobody@127.0.0.1:1/nothing?password=s3cret")
    env.update(
        SCHEDULER_DATABASE__CONNECT_RETRY_SECONDS="0", SCHEDULER_HTTP__PORT="0", SCHEDULER_LOGGING__FORMAT="json"
    )
    for args in (["jobs", "list"], ["run"]):
        proc = cli(env, *args)
        assert proc.returncode == 3, proc.stderr
        assert "s3cret" not in proc.stdout + proc.stderr, args
    assert "nothing?password=***" in proc.stdout + proc.stderr  # the run's start line


# ----------------------------------------------------- closed standard streams
def closed(shell_redirect: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command with a standard stream closed by the shell (``>&-``, ``2>&-``, ``<&-``)."""
    command = " ".join(f"'{a}'" for a in (sys.executable, "-m", "scheduler_daemon", *args))
    return subprocess.run(
        ["sh", "-c", f"exec {command} {shell_redirect}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


async def test_a_closed_stdout_stderr_or_stdin_is_like_dev_null_never_a_traceback(fresh_url: str) -> None:
    env = env_for(fresh_url)
    # stderr closed: progress and logs have nowhere to go, the work is still done.
    upgrade = closed("2>&-", env, "db", "upgrade")
    assert (upgrade.returncode, upgrade.stdout) == (0, f"schema upgraded: (empty) -> {HEADS}\n")
    assert cli(env, "demo").returncode == 0
    simulate = closed("2>&-", env, "simulate", "--world", "1", "--game-hours", "0.1", "--dry-run")
    assert simulate.returncode == 0 and simulate.stdout.startswith("World 1")
    # An error with stderr closed is not printed on stdout instead (it would corrupt the output).
    failing = closed("2>&-", env, "worlds", "show", "999")
    assert (failing.returncode, failing.stdout) == (1, "")

    # stdout closed: the results are discarded, as into /dev/null.
    readers = (["worlds", "list"], ["export"], ["--version"], ["db", "check"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda args: closed(">&-", env, *args), readers))
    for args, proc in zip(readers, procs, strict=True):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)

    # stdin closed: an empty input, said in one line.
    imported = closed("<&-", env, "import", "-")
    assert imported.returncode != 0 and imported.stdout == "", imported
    assert imported.stderr.startswith("scheduler-daemon: error: <stdin>:") and len(imported.stderr.splitlines()) == 1


def test_a_sqlite_uri_opens_its_file_and_names_it(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    assert cli(env_for(f"sqlite+aiosqlite:///file:{db}?uri=true"), "db", "upgrade").returncode == 0
    read_only = cli(env_for(f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true"), "worlds", "list")
    assert (read_only.returncode, read_only.stdout.split()[:2], read_only.stderr) == (0, ["ID", "NAME"], "")
    missing = tmp_path / "no" / "scheduler.db"
    proc = cli(env_for(f"sqlite+aiosqlite:///file:{missing}?uri=true"), "worlds", "list")
    assert (proc.returncode, proc.stderr) == (
        3,
        f"scheduler-daemon: error: cannot open the database: SQLite file {missing} "
        f"(from SCHEDULER_DATABASE__URL): its directory {missing.parent} does not exist\n",
    )
