"""Static checks of the shipped systemd units, plus ``systemd-analyze`` when present.

The parser is a small hand-written one because unit files allow repeated keys
(``Environment=``), empty assignments (``CapabilityBoundingSet=``) and
backslash continuations, which configparser does not model faithfully.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
BASE = "scheduler-daemon.service"
RELOAD = "scheduler-daemon-reload.service"
TEMPLATE = "scheduler-daemon@.service"
ALL_UNITS = [BASE, RELOAD, TEMPLATE]

EXEC_START = "/opt/scheduler-daemon/bin/scheduler-daemon run --config /etc/scheduler-daemon/config.toml"
MIGRATE = "/opt/scheduler-daemon/bin/scheduler-daemon --config /etc/scheduler-daemon/config.toml db upgrade"

# Directives every variant must carry, with their exact values.
REQUIRED_SERVICE: dict[str, str] = {
    "ExecStart": EXEC_START,
    "WatchdogSec": "30s",
    "Restart": "on-failure",
    "DynamicUser": "yes",
    "ConfigurationDirectory": "scheduler-daemon",
    "LoadCredential": "admin-token:/etc/scheduler-daemon/admin-token",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallErrorNumber": "EPERM",
    "SystemCallArchitectures": "native",
    "PrivateMounts": "yes",
    "ProtectProc": "invisible",
    "PrivateUsers": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LimitNOFILE": "65536",
}
# Present with any (non-empty) value.
REQUIRED_NONEMPTY = ["RestartSec", "TimeoutStopSec", "StateDirectory"]
# ProcSubset=pid hides /proc/stat from the process_* collector;
# MemoryDenyWriteExecute breaks libffi-based native code.
FORBIDDEN_SERVICE = ["ProcSubset", "MemoryDenyWriteExecute"]

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Parse a unit file into ``{section: [(key, value), ...]}`` keeping repeats."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {raw!r}"
        current.append((key.strip(), value.strip()))
    assert not pending, "dangling line continuation"
    return sections


def load(name: str) -> Unit:
    return parse_unit((UNIT_DIR / name).read_text(encoding="utf-8"))


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def single(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{section}/{key}: expected exactly one, got {found!r}"
    return found[0]


# --- parser sanity --------------------------------------------------------


def test_parser_handles_repeats_empty_values_and_continuations() -> None:
    unit = parse_unit(
        "# comment\n[Service]\nEnvironment=A=1\nEnvironment=B=2\n"
        "CapabilityBoundingSet=\nExecStart=/bin/true \\\n  --flag\n; other comment\n"
    )
    assert values(unit, "Service", "Environment") == ["A=1", "B=2"]
    assert single(unit, "Service", "CapabilityBoundingSet") == ""
    assert single(unit, "Service", "ExecStart") == "/bin/true  --flag"


# --- static contents ------------------------------------------------------


@pytest.mark.parametrize("name", ALL_UNITS)
def test_required_directives(name: str) -> None:
    unit = load(name)
    assert set(unit) == {"Unit", "Service", "Install"}
    for key, expected in REQUIRED_SERVICE.items():
        assert single(unit, "Service", key) == expected, key
    for key in REQUIRED_NONEMPTY:
        assert single(unit, "Service", key), key
    # An allow-list first, then the deny-list taken out of it (order matters to systemd).
    assert values(unit, "Service", "SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    # Reloadable settings must stay in config.toml: the environment would win over it.
    assert not [v for v in values(unit, "Service", "Environment") if v.startswith("SCHEDULER_LOGGING__")]
    # Optional ("-") root-only secrets file, e.g. a PostgreSQL URL with a password.
    assert values(unit, "Service", "EnvironmentFile")[0] == "-/etc/scheduler-daemon/environment"
    assert single(unit, "Install", "WantedBy") == "multi-user.target"
    assert single(unit, "Unit", "Description")


@pytest.mark.parametrize("name", ALL_UNITS)
def test_forbidden_directives_absent(name: str) -> None:
    unit = load(name)
    for section in unit.values():
        for key, _ in section:
            assert key not in FORBIDDEN_SERVICE, f"{name} must not set {key}="


@pytest.mark.parametrize("name", [BASE, RELOAD])
def test_single_instance_units_migrate_as_the_service_user(name: str) -> None:
    # Not "+"-prefixed: it must run sandboxed as the dynamic user that owns the SQLite file.
    assert values(load(name), "Service", "ExecStartPre") == [MIGRATE]


@pytest.mark.parametrize("name", ALL_UNITS)
def test_open_files_limit_fits_the_default_connection_limit_and_pools(name: str) -> None:
    from structlog.testing import capture_logs

    from scheduler_daemon.http.listener import connection_guard
    from scheduler_daemon.runtime import database_connections
    from scheduler_daemon.settings import Settings

    settings = Settings()
    open_files = int(single(load(name), "Service", "LimitNOFILE"))
    with capture_logs() as logs:
        guard = connection_guard(settings.http, open_files=open_files, database_pools=database_connections(settings))
    assert guard.max_connections == settings.http.max_connections
    assert logs == []


def test_template_does_not_migrate() -> None:
    # N instances starting together would race on the same PostgreSQL schema.
    assert values(load(TEMPLATE), "Service", "ExecStartPre") == []


def test_plain_unit_is_notify_with_sighup_reload() -> None:
    unit = load(BASE)
    assert single(unit, "Service", "Type") == "notify"
    assert single(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert single(unit, "Service", "StateDirectory") == "scheduler-daemon"


def test_reload_unit_uses_notify_reload() -> None:
    unit = load(RELOAD)
    assert single(unit, "Service", "Type") == "notify-reload"
    # systemd implements reload itself; an ExecReload= would take precedence.
    assert values(unit, "Service", "ExecReload") == []
    assert values(unit, "Service", "ReloadSignal") in ([], ["SIGHUP"])
    assert single(unit, "Service", "StateDirectory") == "scheduler-daemon"


def test_template_unit_is_per_instance() -> None:
    unit = load(TEMPLATE)
    assert single(unit, "Service", "Type") == "notify"
    assert "SCHEDULER_SCHEDULER__INSTANCE_ID=%H-%i" in values(unit, "Service", "Environment")
    assert "%i" in single(unit, "Service", "StateDirectory")
    # Instance file last: later EnvironmentFile= lines override earlier ones.
    assert values(unit, "Service", "EnvironmentFile") == [
        "-/etc/scheduler-daemon/environment",
        "-/etc/scheduler-daemon/instance-%i.env",
    ]
    assert "%i" in single(unit, "Unit", "Description")


def _comparable(unit: Unit) -> Unit:
    """Drop what legitimately differs between the variants."""
    varying = {
        "Description",
        "Type",
        "ExecReload",
        "ReloadSignal",
        "TimeoutStartSec",
        "StateDirectory",
        "Environment",
        "EnvironmentFile",
        "ExecStartPre",
    }
    return {s: [(k, v) for k, v in kv if k not in varying] for s, kv in unit.items()}


@pytest.mark.parametrize("name", [RELOAD, TEMPLATE])
def test_variants_do_not_drift_from_plain_unit(name: str) -> None:
    assert _comparable(load(name)) == _comparable(load(BASE))


# --- systemd-analyze --------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not on PATH (Debian: apt-get install -y systemd)",
)


def systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def staged_unit(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    """Copy a unit to tmp_path with ExecStart pointing at an existing executable.

    ``verify`` fails on a missing ExecStart binary, and /opt/scheduler-daemon
    does not exist on CI machines.
    """
    fake = tmp_path / "bin" / "scheduler-daemon"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    text = (UNIT_DIR / name).read_text(encoding="utf-8")
    assert "/opt/scheduler-daemon/bin/scheduler-daemon " in text
    text = text.replace("/opt/scheduler-daemon/bin/scheduler-daemon ", f"{fake} ")
    target = tmp_path / (as_name or name)
    target.write_text(text, encoding="utf-8")
    return target


# Warnings systemd < 253 prints for the notify-reload variant; anything else
# on stderr (unknown keys, bad values, ...) is a failure.
PRE_253_RELOAD_NOISE = (
    re.compile(r".*: Failed to parse service type, ignoring: notify-reload$"),
    re.compile(r".*: Unknown key '?ReloadSignal'? in section '?\[?Service\]?'?, ignoring\.$"),
)


@needs_analyze
@pytest.mark.parametrize(
    ("name", "as_name"),
    [
        (BASE, None),
        (RELOAD, None),
        (TEMPLATE, None),
        (TEMPLATE, "scheduler-daemon@7.service"),
    ],
)
def test_systemd_analyze_verify(tmp_path: Path, name: str, as_name: str | None) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = staged_unit(tmp_path, name, as_name)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and only warns, so stderr is checked too.
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if name == RELOAD and systemd_version() < 253:
        lines = [ln for ln in lines if not any(p.match(ln) for p in PRE_253_RELOAD_NOISE)]
    assert proc.returncode == 0, proc.stderr
    assert lines == []


# The hardening budget: every shipped unit scores at most this (0 = fully locked down, 10 = none).
MAX_EXPOSURE = 1.2
EXPOSURE_LINE = re.compile(r"Overall exposure level for \S+: (\d+\.\d)")


def analyze_has_offline() -> bool:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "--help"], capture_output=True, text=True, check=True).stdout
    return "--offline" in out


@needs_analyze
@pytest.mark.parametrize(("name", "as_name"), [(BASE, None), (RELOAD, None), (TEMPLATE, "scheduler-daemon@7.service")])
def test_systemd_analyze_security_exposure(tmp_path: Path, name: str, as_name: str | None) -> None:
    """Catch hardening regressions: every unit's exposure stays at or below MAX_EXPOSURE."""
    if not analyze_has_offline():
        pytest.skip(f"systemd-analyze {systemd_version()} lacks --offline (systemd >= 250 has it)")
    assert SYSTEMD_ANALYZE is not None
    unit = staged_unit(tmp_path, name, as_name)
    proc = subprocess.run(
        # --threshold is in tenths: 12 == exposure level 1.2.
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = EXPOSURE_LINE.search(proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
