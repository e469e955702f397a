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
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _micro(out: Path, only: str, env: dict[str, str]) -> dict[str, Any]:
    """``python -m bench --micro --only ONLY`` into ``out``; its JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--micro", "--only", only, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads((out / "micro.json").read_text()))


def test_bench_micro_writes_json_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("apscheduler", reason="benchmark dependencies: pip install -e '.[dev]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SCHEDULER_TEST_POSTGRES_URL", None)  # the PostgreSQL part is covered by `make bench-quick`
    result = _micro(tmp_path, "core,sqlite", env)
    core = result["core"]
    for key in ("cpu_ratio_vs_floor", "cpu_ratio_vs_apscheduler", "p99_lag_ms", "worlds"):
        assert key in core
    assert {r["impl"] for r in core["runs"]} == {"floor", "apscheduler", "runner"}
    assert all(r["ticks"] > 0 for r in core["runs"] if r["impl"] != "apscheduler")
    sqlite = result["e2e_sqlite"]
    assert sqlite["runs"]["daemon"]["npc_decisions"] > 0 and sqlite["runs"]["naive_orm"]["npc_decisions"] > 0
    assert sqlite["ratio_vs_naive_orm"] > 0
    # The sustained search: bisection probes, then a confirming window, every window kept.
    assert isinstance(sqlite["sustained_worlds"], int) and 0 <= sqlite["sustained_worlds"] <= 4
    assert sqlite["seed_seconds"] > 0
    kinds = [r["kind"] for r in sqlite["sustain_runs"]]
    assert kinds[0] == "probe" and "confirm" in kinds
    assert all(r["ticks"] > 0 and r["worlds"] >= 1 for r in sqlite["sustain_runs"])
    cpu = sqlite["client_cpu_us_per_decision"]
    assert cpu["flat_out"] > 0 and cpu["at_1hz"] > 0
    assert sqlite["cpu_ratio_1hz_vs_flat"] == pytest.approx(cpu["at_1hz"] / cpu["flat_out"])
    machine = result["machine"]
    assert machine["cpus"] >= 1 and len(machine["loadavg_at_start"]) == len(machine["loadavg_at_end"]) == 3
    table = (tmp_path / "micro.md").read_text()
    assert "| `core.cpu_ratio_vs_floor` |" in table and "| `e2e_sqlite.sustained_worlds` |" in table
    assert (tmp_path / "micro-lag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_micro_postgresql_writes_the_ceiling_and_sustained_keys(tmp_path: Path) -> None:
    server = os.environ.get("SCHEDULER_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("SCHEDULER_TEST_POSTGRES_URL is not set")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pg = _micro(tmp_path, "pg", env)["e2e_pg"]
    assert {"daemon", "db_ceiling", "naive_orm", "raw_floor", "raw_ceiling"} <= pg["runs"].keys()
    assert pg["db_ceiling_rows_per_s"] > 0
    assert pg["daemon_vs_db_ceiling"] == pytest.approx(
        pg["daemon_saturated_npc_decisions_per_s"] / pg["db_ceiling_rows_per_s"]
    )
    assert isinstance(pg["sustained_worlds"], int) and 0 <= pg["sustained_worlds"] <= 4
    assert pg["client_cpu_us_per_decision"]["flat_out"] > 0 and pg["cpu_ratio_1hz_vs_flat"] > 0
    # Every window of the search starts vacuumed; the size of npcs it started from is kept.
    assert all(r["npcs_table_mib"] > 0 for r in pg["sustain_runs"])
    assert "| `e2e_pg.daemon_vs_db_ceiling` |" in (tmp_path / "micro.md").read_text()
