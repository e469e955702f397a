"""Markdown table and PNG plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import progress

TARGETS = {
    "core.cpu_ratio_vs_floor": ("≤ 1.5", lambda v: v <= 1.5),
    "core.cpu_ratio_vs_apscheduler": ("≤ 0.33", lambda v: v <= 1 / 3),
    "core.p99_lag_ms": ("≤ 2 ms", lambda v: v <= 2.0),
    "e2e_pg.ratio_vs_naive_orm": ("≥ 5", lambda v: v >= 5.0),
    "e2e_pg.ratio_vs_raw_floor": ("≥ 1.5", lambda v: v >= 1.5),
    "e2e_pg.ratio_vs_raw_ceiling": ("≥ 0.8", lambda v: v >= 0.8),
    "e2e_pg.sustained_worlds": ("≥ 1000", lambda v: v >= 1000),
    "e2e_pg.p99_lag_ms": ("< 100 ms", lambda v: v < 100.0),
    "e2e_sqlite.ratio_vs_naive_orm": ("≥ 5 (same as PG)", lambda v: v >= 5.0),
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_markdown(results: dict[str, Any], path: Path) -> str:
    """The ratio table against the issue's targets plus one row per measured run."""
    lines = [
        f"Benchmark ({results['mode']} mode, {results['machine']['cpus']} CPUs, "
        f"load average {results['machine']['loadavg_at_start'][0]:.1f} at start; "
        "the machine was shared, figures are noisy)",
        "",
        "| key | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, (target, check) in TARGETS.items():
        section, name = key.split(".")
        value = results.get(section, {}).get(name)
        if value is None:
            continue
        lines.append(f"| `{key}` | {_fmt(value)} | {target} | {'yes' if check(value) else 'no'} |")
    core = results.get("core")
    if core:
        lines += [
            "",
            "Scheduler core, no database (no-op tick, 1 Hz):",
            "",
            "| implementation | worlds | CPU % of a core | CPU s / 1000 scheduled ticks | p50 lag ms | p99 lag ms | "
            "max lag ms | missed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in core["runs"]:
            label = f"{r['impl']} (run {r['repeat'] + 1})" if r.get("repeat") else r["impl"]
            lines.append(
                f"| {label} | {r['worlds']} | "
                f"{r['cpu_core_fraction'] * 100:.1f} | "
                f"{r['cpu_s_per_1000_ticks']:.4f} | {r['p50_lag_ms']:.2f} | {r['p99_lag_ms']:.2f} | "
                f"{r['max_lag_ms']:.1f} | {r['missed_ticks']} |"
            )
    for section, title in (("e2e_pg", "PostgreSQL"), ("e2e_sqlite", "SQLite")):
        data = results.get(section)
        if not data or "runs" not in data:
            continue
        lines += [
            "",
            f"End to end on {title}: {data['worlds_saturated']} worlds × 500 NPCs ticked flat out:",
            "",
            "| implementation | NPC decisions/s | daemon ÷ it | world ticks/s | client CPU % of a core | "
            "decisions per client CPU-s | daemon ÷ it per CPU-s |",
            "|---|---|---|---|---|---|---|",
        ]
        for impl, r in data["runs"].items():
            ratio = data.get(f"ratio_vs_{impl}")
            cpu_ratio = data.get(f"cpu_efficiency_ratio_vs_{impl}")
            lines.append(
                f"| {impl} | {r['npc_decisions_per_s']:.0f} | {_fmt(ratio) if ratio else '—'} | "
                f"{r['ticks_per_s']:.1f} | {r['cpu_core_fraction'] * 100:.0f} | {r['npc_decisions_per_cpu_s']:.0f} | "
                f"{_fmt(cpu_ratio) if cpu_ratio else '—'} |"
            )
        lines += [
            "",
            f"Daemon at 1 Hz on {title}:",
            "",
            "| worlds | NPC decisions/s | p50 lag ms | p99 lag ms | missed | failed | RSS MiB start→end | sustained |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in data["sustain_runs"]:
            lines.append(
                f"| {r['worlds']} | {r['npc_decisions_per_s']:.0f} | {r['p50_lag_ms']:.1f} | {r['p99_lag_ms']:.1f} | "
                f"{r['missed_ticks']} | {r['failed_ticks']} | {r['rss_mib_start']:.0f}→{r['rss_mib_end']:.0f} | "
                f"{'yes' if r['sustained'] else 'no'} |"
            )
    startup = {k: v for k, v in results.get("startup", {}).items() if "seconds_to_ready" in v}
    if startup:
        lines += [
            "",
            "Start-up of the real daemon (worlds ticking every 5 s, 5 NPCs each):",
            "",
            "| backend | worlds | s to READY=1 | EXTEND_TIMEOUT sent | RSS MiB at READY → after settling | "
            "ticks/s after READY (expected) |",
            "|---|---|---|---|---|---|",
        ]
        for backend, r in startup.items():
            lines.append(
                f"| {backend} | {r['worlds']} | {r['seconds_to_ready']} | {r['extend_timeout_messages']} | "
                f"{r['rss_mib_at_ready']}→{r['rss_mib_after_settle']} | "
                f"{r['ticks_per_s_after_ready']} ({r['ticks_per_s_expected']}) |"
            )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    """p99 tick lag versus world count (core implementations and the daemon end to end)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    core = results.get("core", {})
    for impl in ("floor", "apscheduler", "runner"):
        runs = sorted(
            (r for r in core.get("runs", []) if r["impl"] == impl and not r.get("repeat")), key=lambda r: r["worlds"]
        )
        if runs:
            ax.plot([r["worlds"] for r in runs], [r["p99_lag_ms"] for r in runs], marker="o", label=f"core: {impl}")
    for section, label in (("e2e_pg", "daemon e2e PostgreSQL"), ("e2e_sqlite", "daemon e2e SQLite")):
        runs = results.get(section, {}).get("sustain_runs", [])
        if runs:
            ax.plot([r["worlds"] for r in runs], [r["p99_lag_ms"] for r in runs], marker="s", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("worlds (1 Hz each)")
    ax.set_ylabel("p99 tick lag (ms)")
    ax.set_title(f"Tick lag vs world count ({results['mode']} mode, shared 2-core machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
