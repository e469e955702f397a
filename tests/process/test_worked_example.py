"""The worked example of docs/integration.md, run as a user pastes it: its shell blocks, in order, in bash.

Only the port changes (a free one instead of 9464, in the blocks and for the daemon), and the clone is a scratch
directory with this checkout's virtualenv and example config.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.harness import free_port
from tests.process.test_daemon_world_time import ROOT

pytestmark = pytest.mark.subprocess

HEADING = "## Worked example"


def worked_example() -> str:
    """The shell blocks of the worked example section, joined in order."""
    text = (ROOT / "docs" / "integration.md").read_text()
    section = text[text.index(HEADING) :]
    following = section.find("\n## ", len(HEADING))
    section = section if following < 0 else section[:following]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) >= 4, "the worked example lost its shell blocks"
    return "\n".join(blocks)


@pytest.mark.skipif(shutil.which("sqlite3") is None and not os.environ.get("CI"), reason="needs the sqlite3 shell")
def test_the_worked_example_runs_as_written(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    (tmp_path / ".venv").symlink_to(venv)
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.example.toml")
    port = free_port()
    script = worked_example().replace("9464", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_HTTP__PORT"] = str(port)  # the daemon's side of the same substitution
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        # The script, and the daemon it started if it failed before killing it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.communicate()
    log = tmp_path / "var" / "example.log"
    context = f"stdout:\n{out}\nstderr:\n{err}\ndaemon log:\n{log.read_text() if log.exists() else '(none)'}"
    assert proc.returncode == 0, context
    assert "dry run (every world rolled back, nothing committed)" in out, context
    assert "imported:" in out and "1 created, 0 updated, 0 failed" in out, context
    assert '"externalId":"harbor"' in out, context
    assert out.rstrip().endswith("204"), context
    backup = (tmp_path / "var" / "backup.json").read_text()
    for name in ("harbor", "cove", "mill"):
        assert f'"externalId": "{name}"' in backup or f'"externalId":"{name}"' in backup, backup[:2000]
