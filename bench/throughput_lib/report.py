"""The outputs: hardware, versions and commit, the JSON report (schema fastcog.bench.throughput/1),
the markdown table, the PNG, and the output files' names."""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import CPU_NOTE, REPO
from .metrics import FP8_PARITY_RTOL, PARITY_RTOL, evaluate_targets, parity, parity_rtol, path_metrics

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config

    from .models import Bench
    from .paths import PathResult


# --------------------------------------------------------------------------------------------
# Environment: hardware, versions, commit
# --------------------------------------------------------------------------------------------


def hardware(device: torch.device) -> dict[str, Any]:
    """Model names only: nothing that identifies the machine."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gb": props.total_memory / 1e9, "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count}
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "name": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    from importlib import metadata

    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "diffusers", "peft", "transformers", "torchao", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def git_info() -> dict[str, Any]:
    """The commit and whether tracked files differ from it; a copy without .git (the GPU machine)
    can pass them in FASTCOG_GIT_COMMIT / FASTCOG_GIT_DIRTY."""

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(status), "source": "git"}
    env_dirty = os.environ.get("FASTCOG_GIT_DIRTY")
    return {"commit": os.environ.get("FASTCOG_GIT_COMMIT"),
            "dirty": None if env_dirty is None else env_dirty.lower() in ("1", "true", "yes"),
            "source": "environment (no git checkout)" if os.environ.get("FASTCOG_GIT_COMMIT") else "unknown"}


# --------------------------------------------------------------------------------------------
# Report: JSON, markdown, PNG
# --------------------------------------------------------------------------------------------


def build_report(args: argparse.Namespace, argv: list[str], bench: Bench, results: list[PathResult],
                 base_source: str, started: str, env: dict[str, Any], complete: bool) -> dict[str, Any]:
    from fastcog.config import to_dict

    ref = results[0] if results and results[0].spec.role == "reference" else None
    setup = {
        "variant": bench.variant.name, "architecture": bench.arch_source, "tiny": bench.tiny,
        "checkpoint": None if bench.checkpoint is None else str(bench.checkpoint),
        "frames": results[0].spec.cfg.data.num_frames if results else None,
        "height": results[0].spec.cfg.data.height if results else None,
        "width": results[0].spec.cfg.data.width if results else None,
        "batch_size": results[0].spec.cfg.train.batch_size if results else None,
        "lora_rank": results[0].spec.cfg.lora.rank if results else None,
        "lora_alpha": results[0].spec.cfg.lora.alpha if results else None,
        "lora_targets": list(results[0].spec.cfg.lora.target_modules) if results else None,
        "lora_b_init": bench.lora_b_init, "dtype": bench.dtype, "seed": bench.seed,
        "warmup_steps": bench.warmup, "timed_steps": max((r.spec.steps for r in results), default=0),
        "gradient_accumulation": "1 micro-batch per optimizer step (accumulation only repeats forward+backward)",
        "latent_shape_per_sample": list(bench.latent_shape), "video_tokens_per_sample": bench.video_tokens,
        "text_tokens_per_sample": bench.text_tokens, "model_flops_per_sample": bench.flops_per_sample,
        "flop_convention": "docs/design.md: model FLOPs of forward + backward, recompute not counted",
        "peak_flops_per_s": bench.peak_flops,
        "inputs": "random latents, prompt embeddings (and I2V images) from a seeded host generator; batch k and "
                  "torch.manual_seed(seed + k) at step k in every path",
        "transformer_config": bench.transformer_config,
        "base_config": base_source, "overrides": list(args.overrides),
        "fast_only_overrides": list(args.fast_only_set),
    }
    paths = []
    fast_parity = None
    fast_metrics: dict[str, Any] = {}
    for res in results:
        metrics = path_metrics(res, bench, ref)
        entry: dict[str, Any] = {
            "name": res.spec.name, "role": res.spec.role, "switches": list(res.spec.switches),
            "status": res.status, "frozen_weights_dtype": res.spec.frozen_dtype, "config": to_dict(res.spec.cfg),
            "patches": res.patch_report, "metrics": metrics, "losses": res.losses, "grad_norms": res.grad_norms,
            "lrs": res.lrs,
        }
        if res.error_trace:
            entry["error_trace"] = res.error_trace
        if ref is not None and ref.ok and res is not ref and res.losses:
            entry["parity"] = parity(ref, res, parity_rtol(res, args.parity_rtol))
        if res.spec.role == "fastcog":
            fast_parity, fast_metrics = entry.get("parity"), metrics
        paths.append(entry)
    ref_metrics = paths[0]["metrics"] if paths else {}
    return {
        "schema": "fastcog.bench.throughput/1",
        "complete": complete,
        "date": started,
        "cpu_run": bench.device.type != "cuda",
        "note": CPU_NOTE if bench.device.type != "cuda" else None,
        "command": ["python", "bench/throughput.py", *argv],
        "hardware": env["hardware"],
        "versions": env["versions"],
        "git": env["git"],
        "host_peak_rss_gb_whole_process": env.get("host_peak_rss_gb"),
        "setup": setup,
        "parity_tolerance": {
            "rule": "every step: |L - L_ref| / |L_ref| <= rtol (bench/throughput.py docstring has the reasoning)",
            "rtol_by_dtype": PARITY_RTOL, "rtol_fp8": FP8_PARITY_RTOL, "override": args.parity_rtol,
        },
        "paths": paths,
        "speedup": fast_metrics.get("speedup_vs_reference"),
        "parity": fast_parity,
        "targets": evaluate_targets(setup, fast_metrics, fast_parity, ref_metrics, bench.device, bench.tiny),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN / Infinity: non-finite numbers become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def _planned(value: float | None, ratio: float | None, spec: str, none: str = "-") -> str:
    """An estimate and, on a GPU, its ratio to the measured value: "0.8512 (0.41x)"."""
    return _fmt(value, spec, none) + (f" ({ratio:.2f}x)" if ratio is not None else "")


def render_markdown(report: dict[str, Any]) -> str:
    s, hw, v, git = report["setup"], report["hardware"], report["versions"], report["git"]
    cpu = report["cpu_run"]
    title = (f"# fastcog throughput: {s['variant']}{' (tiny architecture)' if s['tiny'] else ''}, "
             f"{s['frames']}x{s['height']}x{s['width']}, batch {s['batch_size']}, LoRA r={s['lora_rank']}, "
             f"{s['dtype']}")
    lines = [title, ""]
    if cpu:
        lines += [f"**{CPU_NOTE}**", ""]
    commit = git.get("commit") or "unknown"
    lines += [
        f"- hardware: {hw['name']} ({hw['device']}); torch {v['torch']}, triton {v['triton']}, diffusers "
        f"{v['diffusers']}, peft {v['peft']}; commit {commit[:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- model: {s['architecture']}; {s['video_tokens_per_sample']} video + {s['text_tokens_per_sample']} text "
        f"tokens per sample; {s['model_flops_per_sample']:.4g} model FLOPs per sample ({s['flop_convention']})",
        f"- {s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per path; same inputs, seeds, timesteps "
        f"and noise in every path; config: {s['base_config']}"
        + (f" + --set {' '.join(s['overrides'])}" if s["overrides"] else ""),
    ]
    if s["fast_only_overrides"]:
        lines.append(f"- **fastcog path only: {' '.join(s['fast_only_overrides'])}: not a like-for-like comparison**")
    lines += ["", "| path | switches on | status | p50 s | p10 s | p90 s | samples/s | video tok/s | TFLOP/s | MFU "
              "| peak alloc GB | peak rsvd GB | plan peak GB | plan step s | warm-up s | speedup | "
              "parity (max rel diff) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    mem_none = "n/m (CPU)" if cpu else "-"
    step_none = "n/a (CPU)" if cpu else "-"
    for p in report["paths"]:
        m = p["metrics"]
        st = m.get("step_time_s", {})
        par = p.get("parity")
        par_s = "reference" if p["role"] == "reference" else (
            f"{par['verdict']} ({_fmt(par['max_rel_diff'], '.2e')})" if par else "-")
        status = p["status"] if len(p["status"]) <= 120 else p["status"][:117] + "..."  # in full in the JSON
        lines.append(
            f"| {p['name']} | {', '.join(p['switches']) or '-'} | {status} | {_fmt(st.get('p50'), '.4f')} | "
            f"{_fmt(st.get('p10'), '.4f')} | {_fmt(st.get('p90'), '.4f')} | {_fmt(m.get('samples_per_s'))} | "
            f"{_fmt(m.get('video_tokens_per_s'), '.4g')} | {_fmt(m.get('model_tflops_per_s'))} | "
            f"{_fmt(m.get('mfu'), '.1%', 'n/a' if cpu else '-')} | "
            f"{_fmt(m.get('peak_memory_allocated_gb'), '.2f', mem_none)} | "
            f"{_fmt(m.get('peak_memory_reserved_gb'), '.2f', mem_none)} | "
            f"{_planned(m.get('planned_peak_gb'), m.get('planned_over_measured'), '.3g')} | "
            f"{_planned(m.get('planned_step_time_s'), m.get('planned_step_time_over_measured'), '.4f', step_none)} | "
            f"{_fmt(m.get('compile_warmup_s'), '.2f')} | "
            f"{_fmt(m.get('speedup_vs_reference'), '.2f')}{'x' if m.get('speedup_vs_reference') else ''} | {par_s} |")
    lines += ["", "p10 / p50 / p90 over the timed steps, device-synchronised; throughput from p50; warm-up s = the "
              "warm-up steps' time minus as many p50 steps (compile, autotune); speedup = reference p50 / path p50. "
              "plan peak / plan step: fastcog.plan's estimates for the path (peak for the fastcog paths only: the "
              "reference's fp32 frozen weights are not what it models; step: the executed FLOPs at the GPU's "
              "datasheet peak, a lower bound), in brackets over the measured peak allocated / p50."]
    par = report["parity"]
    if par:
        lines += ["", f"Parity, fastcog vs reference: loss and pre-clip gradient norm, every step within rtol "
                  f"{par['rtol']:.0e} (step 1: identical weights and inputs):", "",
                  "| step | loss ref | loss fastcog | rel diff | grad norm ref | grad norm fastcog | rel diff | ok |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lo, gr in zip(par["loss"]["per_step"], par["grad_norm"]["per_step"]):
            lines.append(f"| {lo['step']} | {_fmt(lo['reference'], '.6f')} | {_fmt(lo['path'], '.6f')} | "
                         f"{_fmt(lo['rel_diff'], '.2e')} | {_fmt(gr['reference'], '.6g')} | "
                         f"{_fmt(gr['path'], '.6g')} | "
                         f"{_fmt(gr['rel_diff'], '.2e')} | {'yes' if lo['pass'] and gr['pass'] else 'NO'} |")
        w = par.get("final_lora_weights") or {}
        lines += ["", f"**Parity: {par['verdict']}** (max rel diff: loss {_fmt(par['loss']['max_rel_diff'], '.2e')}, "
                  f"grad norm {_fmt(par['grad_norm']['max_rel_diff'], '.2e')}, over {par['steps_compared']} steps; "
                  f"final LoRA weights ||W - W_ref|| / ||W_ref - W_init|| = {_fmt(w.get('rel_to_update'), '.3g')}, "
                  "reported only)"]
    else:
        lines += ["", "**Parity: not computed** (a path failed)"]
    lines.append(f"**Speedup (reference p50 / fastcog p50): {_fmt(report['speedup'], '.2f')}"
                 f"{'x' if report['speedup'] else ''}**" + (" (CPU: not a performance claim)" if cpu else ""))
    t = report["targets"]
    if t["applicable"]:
        lines.append("Targets: " + "; ".join(
            f"{k}: {'met' if t[k]['met'] else 'NOT met'}" for k in ("speedup_min_2.5", "mfu_min_0.60",
                                                                    "peak_memory_le_reference", "loss_parity")))
    else:
        lines.append(f"Targets not judged: {t['not_applicable_because']}")
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Left: the loss per step of every path; middle: the fastcog path's per-step relative difference
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
        main = p["role"] != "ablation"
        steps = list(range(1, len(p["losses"]) + 1))
        losses = [x if isinstance(x, float) and math.isfinite(x) else float("nan") for x in p["losses"]]
        ax_loss.plot(steps, losses, label=p["name"], linewidth=2.2 if main else 1.0,
                     linestyle={"reference": "-", "fastcog": "--"}.get(p["role"], ":"),
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
        ax_diff.set_title(f"fastcog vs reference: parity {par['verdict']}")
        ax_diff.legend(fontsize=7)
    else:
        ax_diff.text(0.5, 0.5, "parity not computed (a path failed)", ha="center", transform=ax_diff.transAxes)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel(f"relative difference (exact = {1e-12:.0e})")

    names = [p["name"] for p in paths]
    p50 = [p["metrics"].get("step_time_s", {}).get("p50", 0.0) for p in paths]
    lo = [max(0.0, v - p["metrics"].get("step_time_s", {}).get("p10", v)) for v, p in zip(p50, paths)]
    hi = [max(0.0, p["metrics"].get("step_time_s", {}).get("p90", v) - v) for v, p in zip(p50, paths)]
    colors = ["tab:gray" if p["role"] == "reference" else "tab:green" if p["role"] == "fastcog" else "tab:blue"
              for p in paths]
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


def output_stem(bench: Bench, cfg: Config, hw: dict[str, Any], started: str) -> str:
    d = cfg.data
    device = "cpu" if hw["device"] == "cpu" else "".join(c if c.isalnum() else "-" for c in hw["name"].lower())
    variant = bench.variant.name + ("-tiny" if bench.tiny else "")
    stamp = started.replace("-", "").replace(":", "")[:15]  # 20261124T220100
    return f"throughput_{variant}_{d.num_frames}x{d.height}x{d.width}_{device}_{stamp}"
