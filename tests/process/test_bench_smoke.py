"""The benchmark harness runs end to end in its micro mode and writes what `make bench` promises.

Speed targets live in the benchmarks, not here: this only checks that every
implementation runs, ticks, and that the result files carry the keys the
closing report and the tables of docs/performance.md are built from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_micro_writes_json_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("apscheduler", reason="benchmark dependencies: pip install -e '.[dev]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SCHEDULER_TEST_POSTGRES_URL", None)  # the PostgreSQL part is covered by `make bench-quick`
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--micro", "--only", "core,sqlite", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "micro.json").read_text())
    core = result["core"]
    for key in ("cpu_ratio_vs_floor", "cpu_ratio_vs_apscheduler", "p99_lag_ms", "worlds"):
        assert key in core
    assert {r["impl"] for r in core["runs"]} == {"floor", "apscheduler", "runner"}
    assert all(r["ticks"] > 0 for r in core["runs"] if r["impl"] != "apscheduler")
    sqlite = result["e2e_sqlite"]
    assert sqlite["runs"]["daemon"]["npc_decisions"] > 0 and sqlite["runs"]["naive_orm"]["npc_decisions"] > 0
    assert sqlite["ratio_vs_naive_orm"] > 0
    assert "| `core.cpu_ratio_vs_floor` |" in (tmp_path / "micro.md").read_text()
    assert (tmp_path / "micro-lag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
