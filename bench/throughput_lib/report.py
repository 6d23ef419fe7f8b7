"""The outputs: hardware, versions and commit, the JSON report (schema fastcog.bench.throughput/1)
and the output files' names (markdown.py writes the table, plot.py the PNG)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import CPU_NOTE, REPO
from .metrics import FP8_PARITY_RTOL, PARITY_RTOL, RTOL_BASIS, evaluate_targets, parity, parity_rtol, path_metrics

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config

    from .models import Bench
    from .paths import PathResult
    from .rows import PathSpec


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
                 base_source: str, started: str, env: dict[str, Any], complete: bool,
                 headline: PathSpec | None = None) -> dict[str, Any]:
    """headline: the row whose parity, speedup and targets the report leads with (rows.headline)."""
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
        "total_steps": bench.total_steps, "rows": list(args.rows),
        "reference_from": None if args.reference_from is None else str(args.reference_from),
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
    top_parity = None
    top_metrics: dict[str, Any] = {}
    for res in results:
        if res.reused_entry is not None:  # --reference-from: reported as the earlier run recorded it
            entry = dict(res.reused_entry)
            metrics = entry.get("metrics") or {}
        else:
            metrics = path_metrics(res, bench, ref)
            entry = {
                "name": res.spec.name, "role": res.spec.role, "switches": list(res.spec.switches),
                "status": res.status, "frozen_weights_dtype": res.spec.frozen_dtype, "config": to_dict(res.spec.cfg),
                "patches": res.patch_report, "attention_kernel": res.attention_kernel,
                "attention_kernels": res.attention_kernels, "metrics": metrics, "losses": res.losses,
                "grad_norms": res.grad_norms, "lrs": res.lrs,
            }
        if res.error_trace:
            entry["error_trace"] = res.error_trace
        if ref is not None and ref.ok and res is not ref and res.losses:
            entry["parity"] = parity(ref, res, *parity_rtol(res, args.parity_rtol))
        if res.spec is headline:
            top_parity, top_metrics = entry.get("parity"), metrics
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
            "provisional": {kind: provisional for kind, (provisional, _) in RTOL_BASIS.items()},
            "basis": {kind: basis for kind, (_, basis) in RTOL_BASIS.items()},
        },
        "headline": None if headline is None else headline.name,
        "paths": paths,
        "speedup": top_metrics.get("speedup_vs_reference"),
        "parity": top_parity,
        "targets": evaluate_targets(setup, top_metrics, top_parity, ref_metrics, bench.device, bench.tiny),
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


def output_stem(bench: Bench, cfg: Config, hw: dict[str, Any], started: str) -> str:
    d = cfg.data
    device = "cpu" if hw["device"] == "cpu" else "".join(c if c.isalnum() else "-" for c in hw["name"].lower())
    variant = bench.variant.name + ("-tiny" if bench.tiny else "")
    stamp = started.replace("-", "").replace(":", "")[:15]  # 20261124T220100
    return f"throughput_{variant}_{d.num_frames}x{d.height}x{d.width}_{device}_{stamp}"
