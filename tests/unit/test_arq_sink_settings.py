"""The ARQ sink's settings (``[generation.arq]``) and how the daemon loads and binds the sink; no Redis needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from scheduler_daemon.plugins import Plugins
from scheduler_daemon.settings import Settings, SettingsError, load_settings, restart_only_changes
from scheduler_daemon.sinks.arq import ArqSink, enqueue
from tests.conftest import PG_ENV

ARQ_SINK = "scheduler_daemon.sinks.arq:enqueue"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SCHEDULER_") and key != PG_ENV:
            monkeypatch.delenv(key)


def config(tmp_path: Path, arq: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[generation]\nsink = "{ARQ_SINK}"\n\n[generation.arq]\n{arq}\n')
    return path


def test_defaults_are_arqs_own() -> None:
    arq = Settings().generation.arq
    assert (arq.redis_url, arq.queue_name, arq.function) == ("redis://127.0.0.1:6379/0", "arq:queue", "generate")
    assert (arq.job_id_prefix, arq.job_expires_seconds) == ("", 86400.0)


def test_the_file_sets_them_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(tmp_path, 'redis_url = "rediss://:secret@redis.internal:6380/2"\nqueue_name = "game:jobs"')
    monkeypatch.setenv("SCHEDULER_GENERATION__ARQ__FUNCTION", "make_portrait")
    arq = load_settings(path).generation.arq
    assert (arq.redis_url, arq.queue_name, arq.function) == (
        "rediss://:secret@redis.internal:6380/2",
        "game:jobs",
        "make_portrait",
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('redis_url = "http://127.0.0.1:6379"', "generation.arq.redis_url: expected a redis://, rediss:// or unix://"),
        ('redis_url = "redis://127.0.0.1:63x9/0"', "generation.arq.redis_url: invalid port"),
        ('redis_url = "redis://127.0.0.1:6379/zero"', "generation.arq.redis_url: the database must be a number"),
        ('redis_url = "redis:///0"', "generation.arq.redis_url: missing host"),
        ('redis_url = "unix://"', "generation.arq.redis_url: a unix:// URL needs the socket's path"),
        ('queue_name = ""', "generation.arq.queue_name: String should have at least 1 character"),
        ('function = ""', "generation.arq.function: String should have at least 1 character"),
        ("job_expires_seconds = 0", "generation.arq.job_expires_seconds: Input should be greater than 0"),
        ("queue = 'x'", "generation.arq.queue: unknown key"),
    ],
)
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, line: str, expected: str) -> None:
    path = config(tmp_path, line)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_redis_url_query_options_are_checked_when_the_sink_is_loaded(tmp_path: Path) -> None:
    path = config(tmp_path, 'redis_url = "redis://127.0.0.1:6379/0?socket_timeout=soon"')
    with pytest.raises(SettingsError, match=r"^generation\.sink: generation\.arq\.redis_url: .*socket_timeout"):
        Plugins.from_settings(load_settings(path))


def test_the_daemon_binds_its_own_sink_to_its_settings(tmp_path: Path) -> None:
    path = config(tmp_path, 'queue_name = "game:jobs"\njob_id_prefix = "prod:"')
    plugins = Plugins.from_settings(load_settings(path))
    assert isinstance(plugins.sink, ArqSink)
    assert plugins.sink is not enqueue  # one per daemon, never the module's shared default
    assert plugins.sink.settings.queue_name == "game:jobs"
    assert plugins.sink.settings.job_id_prefix == "prod:"


async def test_closing_a_sink_that_never_connected_does_nothing() -> None:
    await Plugins().aclose()  # the default sink holds nothing
    await Plugins(sink=ArqSink()).aclose()


def test_changed_arq_settings_need_a_restart(tmp_path: Path) -> None:
    old = load_settings(config(tmp_path, 'queue_name = "a"'))
    new = old.model_copy(
        update={
            "generation": old.generation.model_copy(
                update={"arq": old.generation.arq.model_copy(update={"queue_name": "b"})}
            )
        }
    )
    assert restart_only_changes(old, new) == ["generation.arq.queue_name"]


def test_without_arq_installed_the_error_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [
        m for m in sys.modules if m == "arq" or m.startswith("arq.") or m.startswith("scheduler_daemon.sinks.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "arq", None)  # as if not installed: importing it raises
    monkeypatch.setitem(sys.modules, "arq.connections", None)
    with pytest.raises(SettingsError) as info:
        Plugins.from_settings(load_settings(config(tmp_path, "")))
    message = str(info.value)
    assert message.startswith(f"generation.sink: generation sink '{ARQ_SINK}': importing failed: ")
    assert "install scheduler-daemon[arq]" in message
