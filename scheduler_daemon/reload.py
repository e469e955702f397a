"""Configuration reload (SIGHUP): what a new file must pass before it replaces the running settings.

A reload is all or nothing: the new file is read and checked whole (settings,
decide function and sink importable, admin token readable, security not
weakened, defaults valid for every running world) before anything changes.
Restart-only keys keep their running values and are reported as pending.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler_daemon.http.auth import check_bind_allowed, load_admin_token, token_path
from scheduler_daemon.logs import get_logger
from scheduler_daemon.plugins import Plugins
from scheduler_daemon.settings import HttpSettings, Settings, SettingsError, restart_only_changes

log = get_logger("scheduler_daemon.daemon")


@dataclass
class ReloadState:
    """Reload bookkeeping for metrics, stats and ``systemctl status``.

    The settings the daemon started with count as the first successful load.
    """

    count: int = 0
    ok: bool = True
    error: str | None = None
    success_at: float = field(default_factory=time.time)  # wall time, for humans/metrics
    #: Restart-only keys whose new value is waiting for a restart.
    restart_pending: list[str] = field(default_factory=list)

    def status(self) -> tuple[bool, float | None]:
        """(last reload succeeded, wall time of the last success) for the metrics."""
        return self.ok, self.success_at

    def succeeded(self) -> None:
        self.ok, self.error, self.success_at = True, None, time.time()

    def failed(self, reason: str) -> None:
        self.ok, self.error = False, reason

    def as_stats(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "last_successful": self.ok,
            "last_error": self.error,
            "last_success_timestamp": self.success_at,
            "restart_pending": list(self.restart_pending),
        }


def check_new_settings(
    new: Settings, running: Settings, *, running_token: str | None, config_path: Path | None
) -> str | None:
    """Validate what a reload would change besides the worlds; returns the admin token it would use.

    Raises :class:`SettingsError` (or :class:`ValueError`) naming the field.
    """
    if new.scheduler.behavior != running.scheduler.behavior or new.generation.sink != running.generation.sink:
        Plugins.from_settings(new)  # validated even though they need a restart
    # The token file is re-read on every reload; enabled is restart-only,
    # so the running value decides whether a token is read at all.
    enabled = running.http.enabled
    token = load_admin_token(new.http) if enabled else None
    if enabled:
        refuse_weaker_http(running.http, new.http, had_token=running_token is not None, token=token)
        check_bind_allowed(new.http, token)
    warn_about_permissions(config_path, new.http if enabled else None)
    return token


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with restart-only keys as they run now (so what is reported is what runs), and those keys."""
    changed = restart_only_changes(old, new)
    if not changed:
        return new, changed
    log.warning("settings_need_restart", keys=changed)
    http_kept = ("enabled", "bind", "port", "max_connections", "request_timeout_seconds")
    kept = new.model_copy(
        update={
            "database": old.database,
            "http": new.http.model_copy(update={k: getattr(old.http, k) for k in http_kept}),
            "scheduler": new.scheduler.model_copy(
                update={
                    "instance_id": old.scheduler.instance_id,
                    "lease_ttl_seconds": old.scheduler.lease_ttl_seconds,
                    "behavior": old.scheduler.behavior,
                }
            ),
            "generation": new.generation.model_copy(update={"sink": old.generation.sink, "arq": old.generation.arq}),
        }
    )
    return kept, changed


def refuse_weaker_http(running: HttpSettings, new: HttpSettings, *, had_token: bool, token: str | None) -> None:
    """Refuse a reload that would switch authentication off or move the listener.

    A file caught half-written (valid TOML without ``[http]``) must not open
    the admin API: a daemon started with a token keeps requiring one, and the
    bind address only changes with a restart.
    """
    if had_token and token is None:
        raise SettingsError(
            "http.admin_token_file: the running daemon requires an admin token and the new configuration "
            "configures none (a half-written file?); set it again, or restart to run without one"
        )
    if new.bind != running.bind:
        raise SettingsError(
            f"http.bind: {new.bind!r} differs from the running {running.bind!r}; the bind address changes "
            "only with a restart"
        )


def warn_about_permissions(config_path: Path | None, http: HttpSettings | None) -> None:
    """WARNING for a config file others can write and an admin token file others can read (never fatal)."""
    if config_path is not None:
        mode = _mode(config_path)
        if mode is not None and mode & 0o022:
            log.warning(
                "config_file_writable_by_others",
                path=str(config_path),
                mode=oct(mode),
                hint="chmod go-w: whoever can write it can change the daemon's settings on the next reload",
            )
    path = token_path(http) if http is not None else None
    if path is not None:
        mode = _mode(path)
        if mode is not None and mode & 0o004:
            log.warning(
                "admin_token_file_readable_by_others",
                path=str(path),
                mode=oct(mode),
                hint="chmod o-r, or load it as the systemd credential admin-token",
            )


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return None  # missing or unreadable: reading it reports that
