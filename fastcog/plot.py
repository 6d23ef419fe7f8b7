"""`fastcog plot RUN_DIR`: one PNG of a run's curves, from its metrics.jsonl.

Four panels against the optimizer step: training loss (each step, and smoothed) with the
validation loss where rows carry `val_loss`, the learning rate, the pre-clip gradient norm, and
throughput in samples/s. The trainer writes it at the end of every run, so a finished run can be
judged at a glance without TensorBoard (often not reachable from a cluster).

matplotlib is used through its object API with the Agg canvas, never pyplot: no GUI backend is
needed on a headless node and no global figure state leaks between calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastcog.errors import FastcogError

PLOT_NAME = "metrics.png"


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl; a FastcogError (one line) when there is nothing to plot.

    A last line cut short (the run killed mid-write) is dropped, as are blank lines; any other
    unreadable line is an error naming it.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        what = "is not a folder" if not Path(run_dir).is_dir() else "has no metrics.jsonl"
        raise FastcogError(f"cannot plot {run_dir}: it {what} (give the train.output_dir of a run)")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                break
            raise FastcogError(f"cannot plot {path}: line {n} is not JSON ({err.msg})") from None
    if not rows:
        raise FastcogError(f"cannot plot {path}: it holds no steps yet")
    return rows


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a finite number under `key`.

    Rows are matched by key, not by position, so rows of another kind (validation rows holding
    only `step` and `val_loss`) sit beside the training rows without shifting them. Non-finite
    values (a skipped step's NaN loss) are left out: they are not drawable and would blow up
    the axis.
    """
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in row:
            steps.append(int(row["step"]))
            values.append(float(v))
    return steps, values


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Exponential moving average with a span of `window` steps, bias-corrected at the start
    (TensorBoard's smoothing): early points are not pulled towards zero."""
    alpha = 2 / (window + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def smoothing_window(n: int) -> int:
    """A span of ~5% of the run (at least 1, at most 200 steps): enough to average over the
    timestep noise of the diffusion loss without flattening a short run's trend."""
    return max(1, min(200, n // 20))


def figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """The matplotlib Figure of the run's curves (returned, not saved: tests read its line data)."""
    from matplotlib.figure import Figure

    # Fixed margins, not layout="constrained": that measures every tick label's extent and
    # costs more than drawing the figure, at the end of every run.
    fig = Figure(figsize=(11, 7))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.9, wspace=0.15, hspace=0.22)
    (loss_ax, lr_ax), (norm_ax, thr_ax) = fig.subplots(2, 2, sharex=True)
    steps, loss = series(rows, "loss")
    skipped = sum(1 for r in rows if r.get("skipped"))
    window = smoothing_window(len(loss))
    loss_ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (each step)")
    loss_ax.plot(steps, smooth(loss, window), color="tab:blue", linewidth=1.8,
                 label=f"train (smoothed, span {window})")
    val_steps, val = series(rows, "val_loss")
    if val:
        loss_ax.plot(val_steps, val, color="tab:orange", marker="o", markersize=4, linewidth=1.5, label="validation")
    loss_ax.set_title("loss" + (f" ({skipped} non-finite steps skipped, not drawn)" if skipped else ""))
    loss_ax.legend(loc="upper right", fontsize="small")

    lr_ax.plot(*series(rows, "lr"), color="tab:green")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    _raw_and_smoothed(norm_ax, *series(rows, "grad_norm"), "tab:red")
    norm_ax.set_title("gradient norm (before clipping)")

    thr_steps, thr = series(rows, "samples_per_s")
    # The first step of a process carries one-off warm-up (allocation, compilation): drawn, it
    # would squash the rest of the curve against the axis, so it is left out (as in the summary).
    _raw_and_smoothed(thr_ax, thr_steps[1:], thr[1:], "tab:purple")
    thr_ax.set_title("throughput (samples/s, all ranks; first step left out)")
    for ax in (norm_ax, thr_ax):
        ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, norm_ax, thr_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def _raw_and_smoothed(ax: Any, steps: list[int], values: list[float], color: str) -> None:
    ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
    ax.plot(steps, smooth(values, smoothing_window(len(values))), color=color, linewidth=1.8)


def write_plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/metrics.png); returns the path."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    target = Path(out) if out is not None else run_dir / PLOT_NAME
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if not steps:
        raise FastcogError(f"cannot plot {run_dir / 'metrics.jsonl'}: no line has a step")
    fig = figure(rows, title=f"{run_dir.resolve().name}: steps {min(steps)}-{max(steps)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    return target


def plot_at_end(run_dir: Path) -> Path | None:
    """The trainer's call after the weights are exported: a plot that cannot be drawn (no step in
    metrics.jsonl) is reported in one line and never fails a run that trained."""
    try:
        return write_plot(run_dir)
    except FastcogError as err:
        print(f"fastcog: no plot: {err}")
        return None
