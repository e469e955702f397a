"""Measure world-time drift of the real daemon over a run (issue 2's closing figure).

Starts ``scheduler-daemon run`` on a fresh database with the demo worlds and
polls ``world_states`` every few milliseconds on this process's monotonic
clock. For each world it takes the first and the last commit it saw and
compares the world time between them / timeScale with the monotonic time
between the two observations. The observation error is the commit latency
plus the poll interval, once at each end; it does not accumulate. (The wall
clock is not used: ``last_advanced_at`` is for humans, and a wall clock being
slewed by NTP would show up as drift that is not the daemon's.)

    python bench/drift.py --seconds 60 --url sqlite+aiosqlite:////tmp/drift.db
    python bench/drift.py --seconds 60 --url postgresql+psycopg://postgres@127.0.0.1/drift
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


def _state(engine: sa.Engine) -> dict[int, tuple[float, int, float]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT s.world_id, s.world_time, s.ticks, w.meta FROM world_states s "
                "JOIN worlds w ON w.id = s.world_id WHERE s.ticks > 0"
            )
        ).all()
    out = {}
    for wid, wt, ticks, meta in rows:
        if isinstance(meta, str):
            meta = json.loads(meta)
        out[int(wid)] = (float(wt), int(ticks), float(meta["simulation"]["timeScale"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env.update(SCHEDULER_DATABASE__URL=args.url, SCHEDULER_HTTP__ENABLED="false", SCHEDULER_LOGGING__FORMAT="json")
    exe = [sys.executable, "-m", "scheduler_daemon"]
    for cmd in (["db", "upgrade"], ["demo"]):
        subprocess.run([*exe, *cmd], env=env, check=True, cwd=ROOT, capture_output=True)
    sync_url = args.url.replace("+aiosqlite", "")
    engine = sa.create_engine(sync_url)
    proc = subprocess.Popen([*exe, "run"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    first: dict[int, tuple[float, float, int]] = {}  # world -> (monotonic seen, world time, ticks)
    last: dict[int, tuple[float, float, int]] = {}
    scales: dict[int, float] = {}
    try:
        end = None
        while end is None or time.monotonic() < end:
            seen_at = time.monotonic()
            for wid, (wt, ticks, scale) in _state(engine).items():
                scales[wid] = scale
                if wid not in first:
                    first[wid] = (seen_at, wt, ticks)
                elif ticks != last.get(wid, first[wid])[2]:
                    last[wid] = (seen_at, wt, ticks)
            if end is None and len(first) >= 3:
                end = time.monotonic() + args.seconds
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    results = []
    for wid, (m0, wt0, t0) in sorted(first.items()):
        m1, wt1, t1 = last[wid]
        elapsed = m1 - m0
        game_as_real = (wt1 - wt0) / scales[wid]
        results.append(
            {
                "world": wid,
                "time_scale": scales[wid],
                "ticks": t1 - t0,
                "observed_seconds": round(elapsed, 4),
                "world_seconds_over_scale": round(game_as_real, 4),
                "drift_ms": round((game_as_real - elapsed) * 1000, 3),
                "drift_pct": round((game_as_real - elapsed) / elapsed * 100, 5) if elapsed else None,
            }
        )
    print(json.dumps({"url": engine.url.render_as_string(hide_password=True), "results": results}, indent=2))
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
