"""Admin token loading, the loopback rule, and token rotation on reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler_daemon.daemon import Daemon
from scheduler_daemon.http.auth import check_bind_allowed, is_loopback, load_admin_token, token_path
from scheduler_daemon.settings import HttpSettings, SettingsError, load_settings


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  abc123\n")
    assert load_admin_token(HttpSettings(admin_token_file=f)) == "abc123"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "empty"), (b"\n  \n", "empty"), (b"two words", "one line"), (b"x" * 5000, "larger"), (b"\xff\xfe", "UTF-8")],
)
def test_bad_token_files_name_file_and_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    f = tmp_path / "token"
    f.write_bytes(content)
    with pytest.raises(SettingsError, match=problem) as info:
        load_admin_token(HttpSettings(admin_token_file=f))
    assert str(f) in str(info.value) and "http.admin_token_file" in str(info.value)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_admin_token(HttpSettings(admin_token_file=tmp_path / "nope"))
    with pytest.raises(SettingsError, match=r"cannot read|permission"):
        load_admin_token(HttpSettings(admin_token_file=tmp_path))  # a directory


def test_systemd_credential_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert load_admin_token(HttpSettings()) is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert token_path(HttpSettings()) is None  # directory without the credential
    (tmp_path / "admin-token").write_text("cred\n")
    assert load_admin_token(HttpSettings()) == "cred"
    explicit = tmp_path / "explicit"
    explicit.write_text("file")
    assert load_admin_token(HttpSettings(admin_token_file=explicit)) == "file"  # the setting wins


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    check_bind_allowed(HttpSettings(bind=host), None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org", ""])
def test_non_loopback_without_token_is_refused(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(SettingsError, match="no admin token"):
        check_bind_allowed(HttpSettings(bind=host), None)
    check_bind_allowed(HttpSettings(bind=host), "t")


async def test_reload_rotates_the_token_and_keeps_it_when_the_file_breaks(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\nadmin_token_file = "{token}"\n[metrics]\nper_world = true\n')
    daemon = Daemon(load_settings(config), config)
    daemon.admin_token = "one"
    token.write_text("two")
    assert await daemon.reload() is True
    assert daemon.admin_token == "two"
    token.unlink()
    assert await daemon.reload() is False
    assert daemon.admin_token == "two" and daemon.reloads.ok is False
    assert "not found" in (daemon.reloads.error or "")
    token.write_text("three")
    assert await daemon.reload() is True
    assert daemon.admin_token == "three"


async def test_reload_refuses_to_drop_the_token_or_move_the_listener(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    config = tmp_path / "config.toml"
    good = f'[http]\nadmin_token_file = "{token}"\n'
    config.write_text(good)
    daemon = Daemon(load_settings(config), config)
    daemon.admin_token = "one"
    config.write_text("[metrics]\nper_world = true\n")  # half-written: no [http]
    assert await daemon.reload() is False
    assert daemon.admin_token == "one" and "admin token" in (daemon.reloads.error or "")
    config.write_text(good + 'bind = "127.0.0.2"\n')
    assert await daemon.reload() is False
    assert "http.bind" in (daemon.reloads.error or "")
    config.write_text(good)
    assert await daemon.reload() is True
