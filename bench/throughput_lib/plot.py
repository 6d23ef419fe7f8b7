"""The PNG: every path's loss per step, the headline row's per-step difference from the reference
against the tolerance, and each path's step time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .rows import MAIN_ROLES


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Left: the loss per step of every path; middle: the headline row's per-step relative difference
    from the reference (loss and gradient norm) against the tolerance; right: each path's p50 step
    time (p10-p90 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = report["paths"]
    fig, (ax_loss, ax_diff, ax_time) = plt.subplots(1, 3, figsize=(19, 5.5))
    warm = report["setup"]["warmup_steps"]
    for p in paths:
        if not p["losses"]:
            continue
        main = p["role"] in MAIN_ROLES or p["name"] == report["headline"]
        steps = list(range(1, len(p["losses"]) + 1))
        losses = [x if isinstance(x, float) and math.isfinite(x) else float("nan") for x in p["losses"]]
        ax_loss.plot(steps, losses, label=p["name"], linewidth=2.2 if main else 1.0,
                     linestyle="-" if p["role"] == "reference" else "--" if main else ":",
                     marker="o" if main else None, alpha=1.0 if main else 0.7)
    if warm:
        ax_loss.axvspan(0.5, warm + 0.5, color="0.9", label="warm-up steps")
    ax_loss.set_xlabel("step (same seeds and inputs in every path)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss per step")
    ax_loss.legend(fontsize=7)

    par = report["parity"]
    if par:
        floor = 1e-12  # exact agreement, drawn on the log axis
        for series, marker in (("loss", "o"), ("grad_norm", "s")):
            rows = par[series]["per_step"]
            rel = [r["rel_diff"] if isinstance(r["rel_diff"], float) and math.isfinite(r["rel_diff"]) else 1.0
                   for r in rows]
            ax_diff.semilogy([r["step"] for r in rows], [max(v, floor) for v in rel], marker=marker,
                             label=f"{series.replace('_', ' ')}: |d| / |ref|")
        ax_diff.axhline(par["rtol"], color="tab:red", linestyle="--", label=f"tolerance {par['rtol']:.0e}")
        ax_diff.set_title(f"{report['headline']} vs reference: parity {par['verdict']}")
        ax_diff.legend(fontsize=7)
    else:
        why = "no headline row" if report["headline"] is None else "parity not computed (a path failed)"
        ax_diff.text(0.5, 0.5, why, ha="center", transform=ax_diff.transAxes)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel(f"relative difference (exact = {1e-12:.0e})")

    names = [p["name"] for p in paths]
    p50 = [p["metrics"].get("step_time_s", {}).get("p50", 0.0) for p in paths]
    lo = [max(0.0, v - p["metrics"].get("step_time_s", {}).get("p10", v)) for v, p in zip(p50, paths)]
    hi = [max(0.0, p["metrics"].get("step_time_s", {}).get("p90", v) - v) for v, p in zip(p50, paths)]
    colors = ["tab:gray" if p["role"] == "reference" else "tab:green" if p["name"] == report["headline"] else
              "tab:blue" for p in paths]
    ys = range(len(paths))
    ax_time.barh(ys, p50, xerr=[lo, hi], color=colors)
    for y, p in zip(ys, paths):
        if p["status"] != "ok":
            ax_time.text(0, y, f"  {p['status'][:60]}", va="center", fontsize=7, color="tab:red")
    ax_time.set_yticks(list(ys), names, fontsize=7)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("step time p50, s (bars: p10-p90)")
    ax_time.set_title("step time per path")
    s = report["setup"]
    title = (f"{s['variant']}{' tiny' if s['tiny'] else ''} {s['frames']}x{s['height']}x{s['width']} "
             f"b{s['batch_size']} r{s['lora_rank']} {s['dtype']} on {report['hardware']['name']}")
    if report["cpu_run"]:
        title += "\nCPU run: not a performance claim"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
