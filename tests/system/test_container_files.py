"""Checks of the Dockerfile, compose.yaml and the config they mount, without a Docker engine.

What can be checked here: the files' structure (pinned slim base, multi-stage,
non-root user, health check, no secret written down), and that they agree
with the daemon they run — the entry point parses with the real CLI, the
health check's port is the config default, the mounted config file loads and
names the token and socket paths compose mounts. Building and running the
image needs an engine (``make image``, docs/operations.md "Containers").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from scheduler_daemon.cli import build_parser
from scheduler_daemon.settings import HttpSettings, load_settings
from tests.process.test_daemon_lifecycle import poll_sync
from tests.system.test_systemd_units import BASE, load, single
from tests.system.test_unit_syscalls import listening_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_CONFIG = ROOT / "deploy" / "config.toml"
CONFIG_PATH = "/etc/scheduler-daemon/config.toml"
BASE_IMAGE = re.compile(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their ``(INSTRUCTION, arguments)``; continuations joined, comments dropped."""
    stages: list[Stage] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = re.sub(r"\s+as\s+", " AS ", args, flags=re.IGNORECASE).partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    assert not pending, "dangling line continuation"
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form is refused (signals would go to /bin/sh)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def healthcheck_url(command: list[str]) -> str:
    """The URL a ``python -c`` health check opens (stdlib only: the slim image has no curl)."""
    assert command[:3] == ["python", "-c", command[2]], command
    found = re.search(r"urlopen\('([^']+)'", command[2])
    assert found, command
    return found.group(1)


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """A service's short-syntax ``volumes:`` as ``{target: (source, read_only)}``."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def entrypoint(final: Stage) -> list[str]:
    return exec_form(final.last("ENTRYPOINT"))


# --- Dockerfile -------------------------------------------------------------


def test_parser_joins_continuations_and_splits_stages() -> None:
    stages = parse_dockerfile("# c\nFROM a:1 AS b\nRUN x \\\n  y\nfrom c:2\nUSER 1\n")
    assert [(s.base, s.name) for s in stages] == [("a:1", "b"), ("c:2", None)]
    assert stages[0].instructions == [("RUN", "x  y")]
    assert stages[1].last("USER") == "1"


def test_multi_stage_on_a_pinned_python_311_slim_base(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert BASE_IMAGE.fullmatch(stage.base), f"base image {stage.base!r} is not a pinned python:3.11 slim tag"
    # The venv moves between stages: same base, so its interpreter path exists in the final image.
    assert len({s.base for s in stages}) == 1
    builder = stages[0].name
    assert builder
    assert any(args.startswith(f"--from={builder} ") for args in final.all("COPY"))
    # The project is installed in the builder only; the final stage has no build tools' output.
    assert any("uv sync" in args for args in stages[0].all("RUN"))
    assert not any(re.search(r"pip install|uv (sync|pip)", args) for args in final.all("RUN"))


def test_builder_installs_the_locked_versions_with_the_makefiles_uv(stages: list[Stage]) -> None:
    """What CI tested: uv.lock's pins (a stale lock refused), the postgres extra, no dev tools."""
    builder = stages[0]
    pinned = re.search(r"^UV_VERSION\s*:=\s*(\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    assert pinned, "no UV_VERSION in the Makefile"
    assert f"UV_VERSION={pinned.group(1)}" in builder.all("ARG")
    assert any('uv==${UV_VERSION}"' in args for args in builder.all("RUN"))
    env = " ".join(builder.all("ENV"))
    assert "UV_PROJECT_ENVIRONMENT=/opt/scheduler-daemon" in env
    assert "UV_PYTHON_DOWNLOADS=never" in env  # the base image's interpreter, which the final stage has too
    (sync,) = (args.split() for args in builder.all("RUN") if args.startswith("uv sync"))
    assert {"--locked", "--no-default-groups", "--no-editable"} <= set(sync)
    assert sync[sync.index("--extra") + 1] == "postgres"
    assert not {"--all-extras", "--all-groups", "--group", "--dev", "--frozen"} & set(sync)
    # An extra the project lacks would install without it.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for i, arg in enumerate(sync):
        if arg == "--extra":
            assert sync[i + 1] in extras, f"the Dockerfile installs extra {sync[i + 1]!r}; pyproject.toml has none"


def test_final_user_is_not_root(final: Stage) -> None:
    user = final.last("USER").split(":")
    assert user[0] not in ("root", "0") and all(part.isdigit() for part in user), user
    # The numeric UID is the one created for it, and it owns the state directory.
    created = " ".join(final.all("RUN"))
    assert f"--uid {user[0]}" in created
    assert "-o scheduler -g scheduler" in created


def test_healthcheck_hits_healthz_on_the_default_port(final: Stage) -> None:
    options, _, command = final.last("HEALTHCHECK").partition(" CMD ")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options, option
    url = urlsplit(healthcheck_url(exec_form(command)))
    assert (url.hostname, url.path) == ("127.0.0.1", "/healthz")
    assert url.port == HttpSettings().port
    assert final.all("EXPOSE") == [str(HttpSettings().port)]


def test_stops_with_sigterm_and_runs_the_daemon(final: Stage) -> None:
    assert final.last("STOPSIGNAL") == "SIGTERM"
    entry = entrypoint(final)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entry[0] in scripts
    # The real CLI accepts the command line: --config is a real flag, "run" the default command.
    args = build_parser().parse_args([*entry[1:], *exec_form(final.last("CMD"))])
    assert (args.config, args.command) == (Path(CONFIG_PATH), "run")


def test_no_config_or_secret_is_baked_in(stages: list[Stage]) -> None:
    sources: list[str] = []
    for stage in stages:
        for args in stage.all("COPY") + stage.all("ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            if not args.startswith("--from="):
                sources += parts[:-1]
        for env in stage.all("ENV") + stage.all("ARG"):
            assert not re.search(r"PASSWORD|TOKEN|SECRET", env, re.IGNORECASE), env
    assert sorted(sources) == ["LICENSE", "README.md", "pyproject.toml", "scheduler_daemon", "uv.lock"]
    # The build context is an allow-list: nothing else of the checkout can reach the image.
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "*"
    assert {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")} == set(sources)


# --- compose.yaml -----------------------------------------------------------


def test_postgres_is_healthy_before_migrate_and_daemon(compose: dict[str, Any]) -> None:
    services = compose["services"]
    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    migrate, daemon = services["migrate"], services["daemon"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"
    assert daemon["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    # One image, built from this checkout by migrate (see the test below).
    assert migrate["build"] == "." and migrate["image"] == daemon["image"]


def dependencies(services: dict[str, Any], name: str) -> set[str]:
    """The services ``name`` waits for, directly or through others."""
    found: set[str] = set()
    for dep in services[name].get("depends_on") or {}:
        found |= {dep} | dependencies(services, dep)
    return found


def test_each_image_is_built_by_one_service_that_its_users_wait_for(compose: dict[str, Any]) -> None:
    """Compose's parallel (bake) builder fails a first build when two services build one tag
    ("image ... already exists"); docker-compose 1.x ensures images in dependency order, so a
    service that only names a built image must come after its builder or it is pulled."""
    services = compose["services"]
    builders: dict[str, str] = {}
    for name, service in services.items():
        if "build" in service:
            tag = service.get("image", name)
            assert tag not in builders, f"services {builders[tag]} and {name} both build {tag}"
            builders[tag] = name
    for name, service in services.items():
        builder = builders.get(service.get("image", ""), name)
        assert builder == name or builder in dependencies(services, name), (name, builder)


def test_migrate_command_parses_with_the_image_entrypoint(compose: dict[str, Any], final: Stage) -> None:
    args = build_parser().parse_args([*entrypoint(final)[1:], *compose["services"]["migrate"]["command"]])
    assert args.command == "db"


def test_daemon_healthcheck_matches_the_image(compose: dict[str, Any], final: Stage) -> None:
    daemon = compose["services"]["daemon"]
    test = daemon["healthcheck"]["test"]
    assert test[0] == "CMD"
    _, _, command = final.last("HEALTHCHECK").partition(" CMD ")
    assert test[1:] == exec_form(command)
    assert daemon["ports"] == [f"127.0.0.1:{HttpSettings().port}:{HttpSettings().port}"]
    # Longer than the unit's TimeoutStopSec: a graceful stop is not cut short.
    grace = int(daemon["stop_grace_period"].removesuffix("s"))
    assert grace > int(single(load(BASE), "Service", "TimeoutStopSec").removesuffix("s"))


def test_no_secret_is_written_in_compose(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                # Only the image's *_FILE form, pointing at a compose secret.
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, key)
        assert "env_file" not in service, name
    for name, secret in compose["secrets"].items():
        path = Path(secret["file"])
        assert path.parts[:2] == ("deploy", "secrets"), name
    # The files a user creates there are never committed.
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    # No user:password@ in any URL of the files.
    for path in (COMPOSE, COMPOSE_CONFIG, DOCKERFILE):
        assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", path.read_text(encoding="utf-8")), path


def test_mounted_config_loads_and_agrees_with_compose(compose: dict[str, Any]) -> None:
    daemon = compose["services"]["daemon"]
    mounts = {s: volume_mounts(compose["services"][s]) for s in ("migrate", "daemon")}
    for service in ("migrate", "daemon"):
        source, read_only = mounts[service][CONFIG_PATH]
        assert (ROOT / source).resolve() == COMPOSE_CONFIG and read_only, service
    settings = load_settings(COMPOSE_CONFIG, required=True)
    # Reachable through the published port, which needs the token compose mounts.
    assert settings.http.bind == "0.0.0.0"
    assert settings.http.port == HttpSettings().port
    assert str(settings.http.admin_token_file) == f"/run/secrets/{daemon['secrets'][0]}"
    assert "admin-token" in compose["secrets"]
    # PostgreSQL over the socket directory db shares through a volume, without a password.
    url = make_url(settings.database.url)
    assert url.password is None
    socket_dir = parse_qs(urlsplit(settings.database.url).query)["host"][0]
    volume, _ = mounts["daemon"][socket_dir]
    assert mounts["migrate"][socket_dir][0] == volume
    assert volume_mounts(compose["services"]["db"])["/var/run/postgresql"][0] == volume
    assert url.database == compose["services"]["db"]["environment"]["POSTGRES_DB"]
    assert url.username == compose["services"]["db"]["environment"]["POSTGRES_USER"]


def compose_cli() -> list[str] | None:
    """A compose that validates files without an engine: the docker plugin, else docker-compose 1.x."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_validates_its_file() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither 'docker compose' nor docker-compose is installed (Debian: apt-get install docker-compose)")
    done = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60)
    # Warnings (a key it would ignore) count as failures too.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# --- what the image would hold, run ---------------------------------------


def build_context(target: Path) -> Path:
    """The files ``docker build`` would see: the ``.dockerignore`` allow-list, without caches."""
    target.mkdir()
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    for entry in (ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")):
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, target / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / entry)
    return target


@pytest.mark.subprocess
def test_the_build_context_installs_a_daemon_that_passes_the_healthcheck(tmp_path: Path, final: Stage) -> None:
    """The package built from the build context alone migrates, serves /healthz and stops on STOPSIGNAL."""
    context = build_context(tmp_path / "context")
    lib = tmp_path / "lib"
    # setuptools' build_py lays out what a wheel of this context installs (packages and package data), offline.
    built = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(lib)],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    token = tmp_path / "admin-token"
    token.write_text("container-test-token\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_") and k != "NOTIFY_SOCKET"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    # The mounted config file, with what differs on a test machine overridden the way a container
    # would (the environment wins): SQLite, loopback, any free port, a token file here.
    env.update(
        PYTHONPATH=str(lib),
        SCHEDULER_DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path / 'scheduler.db'}",
        SCHEDULER_HTTP__BIND="127.0.0.1",
        SCHEDULER_HTTP__PORT="0",
        SCHEDULER_HTTP__ADMIN_TOKEN_FILE=str(token),
        SCHEDULER_LOGGING__FORMAT="json",
    )
    where = subprocess.run(
        [sys.executable, "-c", "import scheduler_daemon; print(scheduler_daemon.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(lib), where.stdout
    entry = [sys.executable, "-m", "scheduler_daemon", *entrypoint(final)[1:]]
    entry[entry.index(CONFIG_PATH)] = str(COMPOSE_CONFIG)

    migrated = subprocess.run(
        [*entry, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    _, _, health = final.last("HEALTHCHECK").partition(" CMD ")
    probe = exec_form(health)
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [*entry, *exec_form(final.last("CMD"))], env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        port = poll_sync(lambda: listening_port(log), timeout=60, what="the daemon's port")
        check = [sys.executable, probe[1], probe[2].replace(f":{HttpSettings().port}/", f":{port}/")]
        poll_sync(
            lambda: subprocess.run(check, capture_output=True, timeout=10).returncode == 0,
            timeout=30,
            what="the HEALTHCHECK command to pass",
        )
        daemon.send_signal(signal.Signals[final.last("STOPSIGNAL")])
        assert daemon.wait(timeout=35) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
    # And it fails once nothing answers.
    assert subprocess.run(check, capture_output=True, timeout=10).returncode != 0
