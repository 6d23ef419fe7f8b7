"""The markdown table on stdout: the setup, one row per path, the headline row's parity step by step,
the speedup and the targets."""

from __future__ import annotations

from typing import Any

from .common import CPU_NOTE


def _rtol(par: dict[str, Any]) -> str:
    """The tolerance, marked where no measurement calibrated it (metrics.RTOL_BASIS)."""
    return f"{par['rtol']:.0e}" + (" (provisional)" if par.get("rtol_provisional") else "")


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
    if s.get("reference_from"):
        lines.append(f"- reference: reused from {s['reference_from']} (not run here)")
    lines += ["", "| path | switches on | status | attention kernel | p50 s | p10 s | p90 s | samples/s | video tok/s "
              "| TFLOP/s | MFU | peak alloc GB | peak rsvd GB | plan peak GB | plan step s | warm-up s | speedup | "
              "parity (max rel diff; rtol) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    mem_none = "n/m (CPU)" if cpu else "-"
    step_none = "n/a (CPU)" if cpu else "-"
    for p in report["paths"]:
        m = p["metrics"]
        st = m.get("step_time_s", {})
        par = p.get("parity")
        par_s = ("reference" + (" (reused)" if p.get("reused_from") else "")) if p["role"] == "reference" else (
            f"{par['verdict']} ({_fmt(par['max_rel_diff'], '.2e')}; {_rtol(par)})" if par else "-")
        status = p["status"] if len(p["status"]) <= 120 else p["status"][:117] + "..."  # in full in the JSON
        lines.append(
            f"| {p['name']} | {', '.join(p['switches']) or '-'} | {status} | {p.get('attention_kernel') or '-'} | "
            f"{_fmt(st.get('p50'), '.4f')} | "
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
              "datasheet peak, a lower bound), in brackets over the measured peak allocated / p50. attention "
              "kernel: the attention op (and on a GPU the CUDA kernel) seen in a profile of the last warm-up step. "
              "(provisional): a tolerance from rounding analysis, not calibrated on a GPU run."]
    par, top = report["parity"], report["headline"]
    if par:
        lines += ["", f"Parity, {top} vs reference: loss and pre-clip gradient norm, every step within rtol "
                  f"{_rtol(par)} (step 1: identical weights and inputs):", "",
                  "| step | loss ref | loss path | rel diff | grad norm ref | grad norm path | rel diff | ok |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lo, gr in zip(par["loss"]["per_step"], par["grad_norm"]["per_step"]):
            lines.append(f"| {lo['step']} | {_fmt(lo['reference'], '.6f')} | {_fmt(lo['path'], '.6f')} | "
                         f"{_fmt(lo['rel_diff'], '.2e')} | {_fmt(gr['reference'], '.6g')} | "
                         f"{_fmt(gr['path'], '.6g')} | "
                         f"{_fmt(gr['rel_diff'], '.2e')} | {'yes' if lo['pass'] and gr['pass'] else 'NO'} |")
        w = par.get("final_lora_weights") or {}
        lines += ["", f"**Parity: {par['verdict']}** (max rel diff: loss {_fmt(par['loss']['max_rel_diff'], '.2e')}, "
                  f"grad norm {_fmt(par['grad_norm']['max_rel_diff'], '.2e')}, over {par['steps_compared']} steps; "
                  f"final LoRA weights ||W - W_ref|| / ||W_ref - W_init|| = "
                  f"{_fmt(w.get('rel_to_update'), '.3g', w.get('note') or '-')}, reported only)"]
    elif top is None:
        lines += ["", "**No headline row** (--rows lists neither fastcog nor selective): each row's parity is in "
                  "its table row"]
    else:
        lines += ["", "**Parity: not computed** (a path failed)"]
    if top is not None:
        lines.append(f"**Speedup (reference p50 / {top} p50): {_fmt(report['speedup'], '.2f')}"
                     f"{'x' if report['speedup'] else ''}**" + (" (CPU: not a performance claim)" if cpu else ""))
    t = report["targets"]
    if t["applicable"]:
        lines.append("Targets: " + "; ".join(
            f"{k}: {'met' if t[k]['met'] else 'NOT met'}" for k in ("speedup_min_2.5", "mfu_min_0.60",
                                                                    "peak_memory_le_reference", "loss_parity")))
    else:
        lines.append(f"Targets not judged: {t['not_applicable_because']}")
    return "\n".join(lines) + "\n"
