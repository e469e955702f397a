"""Daemon settings: TOML file + environment, one-line errors naming source, key and problem."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from scheduler_daemon import cli
from scheduler_daemon.settings import (
    MAX_CONFIG_BYTES,
    RELOADABLE,
    RESTART_ONLY,
    Settings,
    SettingsError,
    load_settings,
    restart_only_changes,
)
from tests.conftest import PG_ENV

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the SCHEDULER_* variables they set themselves."""
    for key in list(os.environ):
        if key.upper().startswith("SCHEDULER_") and key != PG_ENV:
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None, *, required: bool = True) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(path, required=required)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_file_values_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[scheduler]\nmax_concurrent_ticks = 3\n[logging]\nlevel = "warning"\n')
    s = load_settings(path)
    assert s.scheduler.max_concurrent_ticks == 3
    assert s.logging.level == "WARNING"
    monkeypatch.setenv("SCHEDULER_SCHEDULER__MAX_CONCURRENT_TICKS", "9")
    monkeypatch.setenv("SCHEDULER_DEFAULTS__SIMULATION", '{"timeScale": 120}')
    s = load_settings(path)
    assert s.scheduler.max_concurrent_ticks == 9  # the environment wins
    assert s.logging.level == "WARNING"  # the file still supplies the rest
    assert s.defaults.simulation == {"timeScale": 120}


def test_no_file_means_defaults_plus_environment_only_when_not_required(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert load_settings(missing, required=False).scheduler.max_concurrent_ticks == 16
    assert error_of(missing) == f"{missing}: config file not found"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # invalid TOML: file, problem and line
        ("[scheduler]\nmax_concurrent_ticks = \n", r"config\.toml: invalid TOML: .*line 2"),
        ("[scheduler\n", r"config\.toml: invalid TOML: .*line 1"),
        # wrong types
        (
            '[scheduler]\nmax_concurrent_ticks = "lots"\n',
            r"config\.toml: scheduler\.max_concurrent_ticks: Input should be a valid integer.*\(got 'lots'\)",
        ),
        ("database = 5\n", r"config\.toml: database: Input should be a valid dictionary"),
        ('[http]\nenabled = "maybe"\n', r"config\.toml: http\.enabled: Input should be a valid boolean"),
        # out of range
        ("[scheduler]\ntick_timeout_seconds = -1\n", r"scheduler\.tick_timeout_seconds: .*greater than 0 \(got -1\)"),
        ("[http]\nport = 70000\n", r"http\.port: Input should be less than or equal to 65535 \(got 70000\)"),
        ('[logging]\nlevel = "LOUD"\n', r"logging\.level: Input should be 'DEBUG', .*\(got 'LOUD'\)"),
        ("[scheduler]\ntick_timeout_seconds = nan\n", r"scheduler\.tick_timeout_seconds: .*finite"),
        ("[defaults.simulation]\ntimeScale = 0\n", r"config\.toml: defaults\.simulation: timeScale: .*greater than 0"),
        ('[database]\nurl = "mysql://db/x"\n', r"database\.url: unsupported database driver 'mysql'"),
        # unknown keys, at every level
        ("[scheduler]\nmax_concurent_ticks = 3\n", r"config\.toml: scheduler\.max_concurent_ticks: unknown key"),
        ("[schedular]\n", r"config\.toml: schedular: unknown key"),
        ('level = "DEBUG"\n', r"config\.toml: level: unknown key"),
    ],
)
def test_bad_file_names_file_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    assert re.search(expected, error_of(write(tmp_path, text)))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[scheduler]\nmax_concurrent_ticks = 0\nbogus = 1\n[http]\nport = -1\n"))
    for key in ("scheduler.max_concurrent_ticks", "scheduler.bogus: unknown key", "http.port"):
        assert key in message


def test_directory_is_refused(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"{tmp_path}: is a directory, not a config file"


def test_file_that_fails_to_read_is_refused() -> None:
    # /proc/self/mem exists and opens, but reading offset 0 fails (EIO): a real I/O error.
    assert re.fullmatch(r"/proc/self/mem: cannot read config file: .+", error_of(Path("/proc/self/mem")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    assert error_of(path) == f"{path}: permission denied reading config file"


def test_huge_file_is_refused_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    with path.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024)  # 10 MB
    assert error_of(path) == f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes; refusing to parse it"


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[logging]\nlevel = "\xe9"\n')
    assert error_of(path) == f"{path}: not valid UTF-8 (byte 19)"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "SCHEDULER_SCHEDULER__MAX_CONCURRENT_TICKS",
            "abc",
            r"^environment SCHEDULER_SCHEDULER__MAX_CONCURRENT_TICKS: "
            r"scheduler\.max_concurrent_ticks: .*\(got 'abc'\)$",
        ),
        ("SCHEDULER_HTTP__PORT", "-3", r"^environment SCHEDULER_HTTP__PORT: http\.port: .*greater than or equal to 0"),
        ("SCHEDULER_LOGGING__LEVEL", "chatty", r"^environment SCHEDULER_LOGGING__LEVEL: logging\.level: "),
        ("SCHEDULER_SCHEDULER__BOGUS", "1", r"^environment SCHEDULER_SCHEDULER__BOGUS: scheduler\.bogus: unknown key$"),
        ("SCHEDULER_LOGING__LEVEL", "DEBUG", r"^environment SCHEDULER_LOGING__LEVEL: unknown section \(known: "),
        (
            "SCHEDULER_DEFAULTS__SIMULATION",
            "{not json",
            r"^environment SCHEDULER_DEFAULTS__SIMULATION: cannot parse the value \(dict-valued settings take JSON\)",
        ),
        (
            "SCHEDULER_DEFAULTS__SIMULATION",
            '{"tickIntervalSeconds": 0}',
            r"^environment SCHEDULER_DEFAULTS__SIMULATION: defaults\.simulation: tickIntervalSeconds: ",
        ),
    ],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    path = write(tmp_path, "[scheduler]\nmax_concurrent_ticks = 4\n")
    monkeypatch.setenv(name, value)
    assert re.search(expected, error_of(path))


def test_file_and_environment_problems_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[http]\nport = 99999\n")
    monkeypatch.setenv("SCHEDULER_SCHEDULER__TICK_TIMEOUT_SECONDS", "0")
    message = error_of(path)
    assert f"{path}: http.port: " in message
    assert "environment SCHEDULER_SCHEDULER__TICK_TIMEOUT_SECONDS: scheduler.tick_timeout_seconds: " in message


def _leaf_keys(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Every setting's dotted key; a sub-section (``generation.arq``) contributes its own keys."""
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_setting_is_either_reloadable_or_restart_only() -> None:
    assert not set(RELOADABLE) & set(RESTART_ONLY)
    assert set(RELOADABLE) | set(RESTART_ONLY) == _leaf_keys()


def test_restart_only_changes_lists_exactly_the_changed_restart_keys(tmp_path: Path) -> None:
    old = load_settings(write(tmp_path, '[scheduler]\ninstance_id = "a"\n'))
    new = load_settings(
        write(
            tmp_path,
            '[scheduler]\ninstance_id = "a"\nmax_concurrent_ticks = 2\n[http]\nport = 1234\n'
            '[database]\nurl = "sqlite:////tmp/other.db"\n[logging]\nlevel = "DEBUG"\n',
            "new.toml",
        )
    )
    assert restart_only_changes(old, new) == ["database.url", "http.port"]
    assert restart_only_changes(old, old) == []


def test_example_config_documents_every_key_with_its_default_and_reload_kind() -> None:
    """config.example.toml: every key present, marked `reload`/`restart` as the code treats it."""
    marker: str | None = None
    section: str | None = None
    documented: dict[str, str | None] = {}
    for line in EXAMPLE.read_text().splitlines():
        if m := re.match(r"#\s*(reload|restart)\.", line):
            marker = m[1]
        elif m := re.match(r"(?:#\s*)?\[([\w.]+)\]", line):  # a commented-out section too
            section = m[1]
            if section == "defaults.simulation":
                documented[section] = marker
        elif (m := re.match(r"#?\s*(\w+)\s*=", line)) and section and section != "defaults.simulation":
            documented[f"{section}.{m[1]}"] = marker
    assert set(documented) == _leaf_keys()
    for key, kind in documented.items():
        assert kind == ("reload" if key in RELOADABLE else "restart"), key
    # Uncommented values are the defaults.
    defaults = Settings()
    for section_name, values in tomllib.loads(EXAMPLE.read_text()).items():
        for key, value in values.items():
            if section_name == "defaults":
                assert value == {} and defaults.defaults.simulation == {}
            else:
                assert getattr(getattr(defaults, section_name), key) == value, f"{section_name}.{key}"


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith(f"{EXAMPLE}: OK")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[scheduler\n", "invalid TOML"),
        ("[scheduler]\ndiscovery_interval_seconds = 0\n", "scheduler.discovery_interval_seconds"),
        ("[http]\nmax_connections = 0\n", "http.max_connections: Input should be greater than or equal to 1"),
        ("[http]\nrequest_timeout_seconds = 0\n", "http.request_timeout_seconds: Input should be greater than 0"),
    ],
)
def test_check_config_fails_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"scheduler-daemon: error: invalid configuration: {path}: ")
    assert expected in err


def test_check_config_of_a_missing_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "nope.toml"), "check-config"]) == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err


def test_defaults_give_every_tick_batch_a_pooled_connection() -> None:
    defaults = Settings()
    assert defaults.scheduler.max_concurrent_ticks <= defaults.database.pool_size


@pytest.mark.parametrize(
    ("url", "pool_size", "warned"),
    [
        ("postgresql+psycopg://db/x", 4, True),
        ("postgresql+psycopg://db/x", 16, False),
        ("sqlite+aiosqlite:///x.db", 4, False),  # no pool to size on SQLite
    ],
)
def test_a_pool_smaller_than_the_tick_concurrency_is_warned_about(url: str, pool_size: int, warned: bool) -> None:
    from structlog.testing import capture_logs

    from scheduler_daemon.daemon import _warn_if_pool_too_small

    settings = Settings.model_validate(
        {"database": {"url": url, "pool_size": pool_size}, "scheduler": {"max_concurrent_ticks": 16}}
    )
    with capture_logs() as logs:
        _warn_if_pool_too_small(settings)
    assert [e["pool_size"] for e in logs if e["event"] == "pool_smaller_than_concurrency"] == (
        [pool_size] if warned else []
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SCHEDULER_DATABASE__URL", "postgresql+psycopg://sched:s3cret@db:54x/sched"),
        ("SCHEDULER_DATABASE__URL", "postgresql://sched:s3cret@[::1/sched"),
        ("SCHEDULER_DATABASE__URL", "mysql://sched@db/sched?password=s3cret"),
        ("SCHEDULER_GENERATION__ARQ__REDIS_URL", "redis://:s3cret@redis:63x/0"),
    ],
)
def test_a_bad_url_is_shown_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    message = error_of(write(tmp_path, ""))
    assert f"environment {name}: " in message
    assert "s3cret" not in message and "***" in message, message
