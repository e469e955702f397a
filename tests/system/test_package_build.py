"""The wheel built from the container's build context carries the metadata users and tools read.

Built offline (setuptools' PEP 517 hook, setuptools from the dev group) from the
``.dockerignore`` allow-list alone, as ``docker build`` sees it: what it lacks,
the image lacks too.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import scheduler_daemon
from tests.system.test_container_files import ROOT, build_context

pytestmark = pytest.mark.subprocess

#: Tools of this repository (the dev and bench dependency groups): never a requirement of the package.
DEV_TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "schemathesis", "apscheduler", "matplotlib", "setuptools")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    context = build_context(tmp / "context")
    # The PEP 517 hook pip or uv would call, without their build isolation: nothing downloads.
    hook = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    built = subprocess.run(
        [sys.executable, "-c", hook, str(tmp / "dist")],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (found,) = (tmp / "dist").glob("scheduler_daemon-*.whl")
    return found


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = (n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_version_is_the_package_version(wheel: Path, metadata: Message) -> None:
    assert metadata["Version"] == scheduler_daemon.__version__
    assert wheel.name.startswith(f"scheduler_daemon-{scheduler_daemon.__version__}-")


def test_license_expression_and_file_are_in_the_wheel(wheel: Path, metadata: Message) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert metadata["License-Expression"] == declared["license"]
    assert metadata.get_all("License-File") == declared["license-files"]
    with zipfile.ZipFile(wheel) as zf:
        shipped = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert shipped, f"no LICENSE in {wheel.name}: {zf.namelist()[-8:]}"
        assert zf.read(shipped[0]).decode() == (ROOT / "LICENSE").read_text(encoding="utf-8")


def test_extras_are_the_user_facing_ones_and_no_dev_tool_is_required(metadata: Message) -> None:
    assert sorted(metadata.get_all("Provides-Extra") or []) == ["arq", "postgres"]
    requires = metadata.get_all("Requires-Dist") or []
    for req in requires:
        assert not req.lower().startswith(DEV_TOOLS), f"dev tool in the published requirements: {req}"
    psycopg = [r for r in requires if r.startswith("psycopg")]
    assert psycopg and all('extra == "postgres"' in r for r in psycopg), psycopg


def test_the_package_is_typed_and_has_its_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "scheduler_daemon/py.typed" in names
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "scheduler-daemon = scheduler_daemon.cli:main" in zf.read(entry_points).decode()


def test_every_file_of_the_package_is_in_the_wheel(wheel: Path) -> None:
    """Package data included by name in pyproject.toml: a new kind of file must be added there."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the package's files")
    tracked = subprocess.run(
        ["git", "ls-files", "scheduler_daemon"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    with zipfile.ZipFile(wheel) as zf:
        missing = sorted(set(tracked) - set(zf.namelist()))
    assert not missing, f"not in the wheel (pyproject.toml [tool.setuptools.package-data]): {missing}"
