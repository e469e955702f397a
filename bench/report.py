"""Markdown table and PNG plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import progress

# Issue 18's targets. The sustained count: p99 tick lag < 100 ms, no missed or failed tick in a 60 s window.
TARGETS = {
    "e2e_pg.sustained_worlds": ("≥ 400", lambda v: v >= 400),
    "e2e_sqlite.sustained_worlds": ("≥ 64", lambda v: v >= 64),
    "e2e_pg.daemon_vs_db_ceiling": ("≥ 0.40", lambda v: v >= 0.40),
    "e2e_pg.client_cpu_us_per_decision.flat_out": ("≤ 15 µs", lambda v: v <= 15.0),
    "e2e_pg.cpu_ratio_1hz_vs_flat": ("≤ 1.3", lambda v: v <= 1.3),
    "e2e_pg.p99_lag_ms": ("< 100 ms", lambda v: v < 100.0),
    "core.cpu_ratio_vs_floor": ("≤ 1.5", lambda v: v <= 1.5),
    "core.cpu_ratio_vs_apscheduler": ("≤ 0.33", lambda v: v <= 1 / 3),
    "core.p99_lag_ms": ("≤ 2 ms", lambda v: v <= 2.0),
}

# Shown for context, without a target (earlier issues' ratios against the hand-written programs).
INFORMATIONAL = (
    "e2e_pg.daemon_saturated_npc_decisions_per_s",
    "e2e_pg.db_ceiling_rows_per_s",
    "e2e_pg.client_cpu_us_per_decision.at_1hz",
    "e2e_pg.ratio_vs_naive_orm",
    "e2e_pg.ratio_vs_raw_floor",
    "e2e_pg.ratio_vs_raw_ceiling",
    "e2e_pg.seed_seconds",
    "e2e_sqlite.daemon_saturated_npc_decisions_per_s",
    "e2e_sqlite.client_cpu_us_per_decision.flat_out",
    "e2e_sqlite.client_cpu_us_per_decision.at_1hz",
    "e2e_sqlite.cpu_ratio_1hz_vs_flat",
    "e2e_sqlite.p99_lag_ms",
    "e2e_sqlite.ratio_vs_naive_orm",
    "e2e_sqlite.seed_seconds",
)


def lookup(results: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (``e2e_pg.client_cpu_us_per_decision.flat_out``), or None."""
    value: Any = results
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_markdown(results: dict[str, Any], path: Path) -> str:
    """The ratio table against the issue's targets plus one row per measured run."""
    machine = results["machine"]
    lines = [
        f"Benchmark ({results['mode']} mode, {machine['cpus']} cores, load average "
        f"{machine['loadavg_at_start'][0]:.1f} at start and {machine['loadavg_at_end'][0]:.1f} at end, "
        f"{results['elapsed_seconds']:.0f} s in all)",
        "",
        "| key | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, (target, check) in TARGETS.items():
        value = lookup(results, key)
        if value is not None:
            lines.append(f"| `{key}` | {_fmt(value)} | {target} | {'yes' if check(value) else 'no'} |")
    for key in INFORMATIONAL:
        value = lookup(results, key)
        if value is not None:
            lines.append(f"| `{key}` | {_fmt(value)} | informational | — |")
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
            "client CPU µs per decision | daemon ÷ it per CPU-s |",
            "|---|---|---|---|---|---|---|",
        ]
        for impl, r in data["runs"].items():
            ratio = data.get("daemon_vs_db_ceiling" if impl == "db_ceiling" else f"ratio_vs_{impl}")
            cpu_ratio = data.get(f"cpu_efficiency_ratio_vs_{impl}")
            lines.append(
                f"| {impl} | {r['npc_decisions_per_s']:.0f} | {_fmt(ratio) if ratio else '—'} | "
                f"{r['ticks_per_s']:.1f} | {r['cpu_core_fraction'] * 100:.0f} | "
                f"{r['client_cpu_us_per_decision']:.1f} | "
                f"{_fmt(cpu_ratio) if cpu_ratio else '—'} |"
            )
        search = data["sustain_search"]
        lines += [
            "",
            f"Daemon at 1 Hz on {title}: {search['probe_seconds']:g} s probes from {search['search_range'][0]} "
            f"worlds (at most {search['search_range'][1]}), then one {search['confirm_seconds']:g} s confirming "
            f"window; sustained: {data['sustained_worlds']} worlds:",
            "",
            "| window | worlds | NPC decisions/s | p50 lag ms | p99 lag ms | missed | failed | "
            "client CPU µs per decision | RSS MiB start→end | sustained |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["sustain_runs"]:
            lines.append(
                f"| {r['kind']} {r['seconds']:.0f} s | {r['worlds']} | {r['npc_decisions_per_s']:.0f} | "
                f"{r['p50_lag_ms']:.1f} | {r['p99_lag_ms']:.1f} | {r['missed_ticks']} | {r['failed_ticks']} | "
                f"{r['client_cpu_us_per_decision']:.1f} | {r['rss_mib_start']:.0f}→{r['rss_mib_end']:.0f} | "
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
        # Every window of the search, in world order; confirming windows marked apart.
        runs = sorted(results.get(section, {}).get("sustain_runs", []), key=lambda r: (r["worlds"], r["kind"]))
        if runs:
            line = ax.plot([r["worlds"] for r in runs], [r["p99_lag_ms"] for r in runs], marker="s", label=label)[0]
            confirms = [r for r in runs if r["kind"] == "confirm"]
            ax.scatter(
                [r["worlds"] for r in confirms],
                [r["p99_lag_ms"] for r in confirms],
                s=120,
                facecolors="none",
                edgecolors=line.get_color(),
                label=f"{label}: confirming window",
            )
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=1, label="100 ms (sustained limit)")
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
