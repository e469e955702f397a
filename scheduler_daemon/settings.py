"""Daemon settings: a TOML file plus ``SCHEDULER_<SECTION>__<KEY>`` environment variables.

The environment wins over the file. Every error names the file (or the
environment), the key and the problem. pydantic-settings would silently skip
a missing TOML file, so the file is read here and handed over as data.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from scheduler_daemon.world_config import WorldConfigError, parse_world_config

DEFAULT_CONFIG_PATH = Path("/etc/scheduler-daemon/config.toml")
#: Refuse absurd files before parsing them (a config file is a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024  # 1 MiB

DEFAULT_BEHAVIOR = "scheduler_daemon.simulation.behavior:decide"
DEFAULT_GENERATION_SINK = "scheduler_daemon.generation:leave_enqueued"


class SettingsError(ValueError):
    """Invalid daemon settings; the message names the source, key and problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


class DatabaseSettings(_Section):
    """``[database]`` (restart-only)."""

    url: str = "sqlite+aiosqlite:////var/lib/scheduler-daemon/scheduler.db"
    pool_size: int = Field(default=16, ge=1, le=200)  # >= max_concurrent_ticks: no connection churn
    max_overflow: int = Field(default=8, ge=0, le=200)
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    #: Keep retrying the first connection for this long before giving up.
    connect_retry_seconds: float = Field(default=60.0, ge=0, le=86400)

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        from scheduler_daemon.store.database import normalize_url

        return normalize_url(value)


class HttpSettings(_Section):
    """``[http]``: the admin API and ``/metrics`` (all restart-only but the token file)."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    admin_token_file: Path | None = None
    #: Open connections at most; a new one evicts the one idle longest (lowered to fit the open-files limit).
    max_connections: int = Field(default=100, ge=1, le=100_000)
    #: From accept, and from the first byte after a response, an answer must start within this; else: closed.
    request_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)


class SchedulerSettings(_Section):
    """``[scheduler]``: the tick loop."""

    discovery_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    #: Recompute every world's NPC tiers at least this often (beyond session changes).
    tier_refresh_max_seconds: float = Field(default=60.0, gt=0, le=86400)
    max_concurrent_ticks: int = Field(default=16, ge=1, le=10_000)
    #: Worlds committed together in one transaction (each atomic on its own).
    max_batch_size: int = Field(default=64, ge=1, le=10_000)
    #: Worlds falling due within this window are dispatched together (a tick may start this much early).
    batch_window_seconds: float = Field(default=0.0015, ge=0, le=1)
    #: Worlds of equal interval whose ticks fall in one slot of this width share a deadline (one batch of at
    #: most ``max_batch_size``); a world's ticks move by less than this once, at registration. ``0``: none.
    phase_slot_seconds: float = Field(default=0.05, ge=0, le=10)
    tick_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    backoff_max_seconds: float = Field(default=60.0, gt=0, le=86400)
    #: Unique per daemon (leases); default hostname-pid.
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", min_length=1, max_length=200
    )
    lease_ttl_seconds: float = Field(default=15.0, ge=1, le=3600)
    #: Behaviour function, ``module:callable``.
    behavior: str = DEFAULT_BEHAVIOR
    #: Daemon processes on this machine sharing the worlds through leases (``run --workers``); >1 needs PostgreSQL.
    workers: int = Field(default=1, ge=1, le=64)


#: ``redis_url`` schemes ARQ (redis-py) accepts.
_REDIS_SCHEMES = ("redis", "rediss", "unix")


class ArqSinkSettings(_Section):
    """``[generation.arq]``: the ARQ sink (``scheduler_daemon.sinks.arq:enqueue``); all restart-only."""

    #: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path/to/socket``.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: The ARQ queue the worker reads (``WorkerSettings.queue_name``); ARQ's default.
    queue_name: str = Field(default="arq:queue", min_length=1, max_length=200)
    #: The name of the worker's job function, called as ``function(ctx, request)``.
    function: str = Field(default="generate", min_length=1, max_length=200)
    #: Prepended to the request's idempotency key to make the ARQ job id; one
    #: Redis database shared by several scheduler databases needs one each.
    job_id_prefix: str = Field(default="", max_length=100)
    #: A job no worker started within this is dropped by ARQ (ARQ's own default: one day).
    job_expires_seconds: float = Field(default=86400.0, gt=0, le=30 * 86400)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # The checks ARQ's RedisSettings.from_dsn would fail on later, with a traceback.
        parsed = urlsplit(value)
        if parsed.scheme not in _REDIS_SCHEMES:
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        try:
            _ = parsed.port
        except ValueError as exc:
            raise ValueError(f"invalid port: {exc}") from None
        if parsed.scheme == "unix":
            if not parsed.path:
                raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis/redis.sock)")
        elif not parsed.hostname:
            raise ValueError("missing host (redis://host:port/db)")
        database = parse_qs(parsed.query).get("db", [])
        if not database and parsed.scheme != "unix" and parsed.path:
            database = [parsed.path.lstrip("/")]
        if database and not database[0].isdigit():
            raise ValueError(f"the database must be a number, got {database[0]!r}")
        return value


class GenerationSettings(_Section):
    """``[generation]``: where claimed generation requests go after each tick's commit."""

    #: Sink, ``module:callable`` receiving each request (restart). The default
    #: accepts and leaves rows ``enqueued`` for workers polling the table.
    sink: str = DEFAULT_GENERATION_SINK
    #: Time one tick's hand-off stage may take (reload; shared by a batch of
    #: worlds ticked together), at most half of ``scheduler.tick_timeout_seconds``.
    #: A slower call counts as a failed hand-off.
    sink_timeout_seconds: float = Field(default=5.0, gt=0, le=3600)
    #: Used by the ARQ sink only.
    arq: ArqSinkSettings = ArqSinkSettings()


class LoggingSettings(_Section):
    """``[logging]`` (reloadable)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: ``auto``: readable console on a TTY, JSON otherwise.
    format: Literal["auto", "console", "json"] = "auto"
    #: Every this many seconds, one INFO line per world: what its NPCs are doing. 0: off.
    activity_summary_seconds: float = Field(default=30.0, ge=0, le=86400)

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class MetricsSettings(_Section):
    """``[metrics]`` (reloadable)."""

    #: Per-world series (label ``world_id``); switch off for very many worlds.
    per_world: bool = True


class DefaultsSettings(_Section):
    """``[defaults]``: world config used under each world's own (reloadable)."""

    simulation: dict[str, Any] = Field(default_factory=dict)

    @field_validator("simulation")
    @classmethod
    def _valid_world_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            parse_world_config(value)
        except WorldConfigError as exc:
            raise ValueError("; ".join(f"{loc}: {msg}" for loc, msg in exc.errors)) from None
        return value


class Settings(BaseSettings):
    """All daemon settings."""

    model_config = SettingsConfigDict(
        env_prefix="SCHEDULER_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    generation: GenerationSettings = GenerationSettings()

    @property
    def hand_off_timeout_seconds(self) -> float:
        """The hand-off stage's effective budget: it runs inside the tick's timeout, so at most half of it."""
        return min(self.generation.sink_timeout_seconds, self.scheduler.tick_timeout_seconds / 2)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's data arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)


#: Settings that only take effect on restart (dotted keys).
RESTART_ONLY = (
    "database.url",
    "database.pool_size",
    "database.max_overflow",
    "database.connect_timeout_seconds",
    "database.connect_retry_seconds",
    "http.enabled",
    "http.bind",
    "http.port",
    "http.max_connections",
    "http.request_timeout_seconds",
    "scheduler.instance_id",
    "scheduler.lease_ttl_seconds",
    "scheduler.behavior",
    "scheduler.workers",
    "generation.sink",
    "generation.arq.redis_url",
    "generation.arq.queue_name",
    "generation.arq.function",
    "generation.arq.job_id_prefix",
    "generation.arq.job_expires_seconds",
)
#: Settings a SIGHUP applies.
RELOADABLE = (
    "logging.level",
    "logging.format",
    "logging.activity_summary_seconds",
    "defaults.simulation",
    "scheduler.discovery_interval_seconds",
    "scheduler.tier_refresh_max_seconds",
    "scheduler.max_concurrent_ticks",
    "scheduler.max_batch_size",
    "scheduler.batch_window_seconds",
    "scheduler.phase_slot_seconds",
    "scheduler.tick_timeout_seconds",
    "scheduler.backoff_max_seconds",
    "metrics.per_world",
    "http.admin_token_file",
    "generation.sink_timeout_seconds",
)


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Restart-only keys whose value differs (reported on reload, never half-applied)."""
    return [key for key in RESTART_ONLY if _get(old, key) != _get(new, key)]


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and parse a TOML config file; errors name the file and the problem."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise SettingsError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise SettingsError(f"{path}: permission denied reading config file") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise SettingsError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes; refusing to parse it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None


_ENV_PREFIX = "SCHEDULER_"


def _scheduler_env() -> dict[str, str]:
    """``SCHEDULER_*`` variables meant as settings (nested ones, with ``__``), upper-cased names."""
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(_ENV_PREFIX) and "__" in k}


def _env_var_for(loc: tuple[str | int, ...], env: dict[str, str]) -> str | None:
    """The environment variable that supplied the value at ``loc``, if any.

    ``SCHEDULER_DEFAULTS__SIMULATION`` supplies every key below
    ``defaults.simulation``, so the longest matching prefix wins.
    """
    parts = [str(p).upper() for p in loc]
    for n in range(len(parts), 0, -1):
        name = _ENV_PREFIX + "__".join(parts[:n])
        if name in env:
            return name
    return None


def _describe_input(value: Any) -> str:
    from scheduler_daemon.store.target import hide_password

    if isinstance(value, dict | list):
        return ""
    # A URL's password must not reach a terminal or a log.
    text = repr(hide_password(value)) if isinstance(value, str) else repr(value)
    return f" (got {text[:60]}{'…' if len(text) > 60 else ''})"


def _format_errors(path: Path | None, exc: ValidationError) -> str:
    """One line: every problem as ``SOURCE: KEY: problem``, where SOURCE is the file or the env var."""
    env = _scheduler_env()
    parts = []
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            # "Value error, " is pydantic's prefix for our own validators' messages.
            msg = err["msg"].removeprefix("Value error, ") + _describe_input(err.get("input"))
        var = _env_var_for(loc, env)
        source = f"environment {var}" if var else (str(path) if path is not None else "defaults")
        parts.append(f"{source}: {key}: {msg}")
    return "; ".join(parts)


def _check_env_sections() -> None:
    """Refuse ``SCHEDULER_<SECTION>__<KEY>`` variables naming no section (a typo is never silent)."""
    sections = {name.upper() for name in Settings.model_fields}
    unknown = sorted(k for k in _scheduler_env() if k[len(_ENV_PREFIX) :].split("__", 1)[0] not in sections)
    if unknown:
        raise SettingsError(
            f"environment {', '.join(unknown)}: unknown section "
            f"(known: {', '.join(sorted(s.lower() for s in sections))})"
        )


def load_settings(path: Path | None = None, *, required: bool = True) -> Settings:
    """Build settings from ``path`` (TOML) and the environment.

    With ``required=False`` a missing file means "defaults plus environment"
    (used when no ``--config`` was given and the default path does not exist).

    Raises:
        SettingsError: one line naming the file or environment variable, the
            key and the problem, for every problem found.
    """
    data: dict[str, Any] = {}
    source: Path | None = None
    if path is not None and (path.exists() or required):
        data = read_config_file(path)
        source = path
    _check_env_sections()
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise SettingsError(_format_errors(source, exc)) from None
    except ValueError as exc:
        # pydantic-settings could not decode an environment value (JSON for
        # dict-valued keys such as SCHEDULER_DEFAULTS__SIMULATION).
        field = re.search(r'field "(\w+)"', str(exc))
        section = f"{_ENV_PREFIX}{field[1].upper()}" if field else _ENV_PREFIX
        names = sorted(k for k in map(str.upper, os.environ) if k == section or k.startswith(section + "__"))
        raise SettingsError(
            f"environment {', '.join(names) or 'SCHEDULER_*'}: cannot parse the value "
            f"(dict-valued settings take JSON): {exc}"
        ) from None
