"""FLOP model, MFU, memory and the per-step metrics sinks (metrics.jsonl, tensorboard, wandb).

FLOP convention (docs/design.md): model FLOPs only, recompute not counted.
  linear forward      2 * N * P_lin          (P_lin: token-wise linear weights of the blocks)
  linear backward     2 * N * P_lin          activation grads only when the base is frozen;
                      + 2 * N * P_lin        weight grads as well for full fine-tuning
  attention forward   4 * N^2 * D * layers   (QK^T and PV, D = heads * head_dim)
  attention backward  2.5 x forward
  LoRA                2 * N * r * (in + out) per adapter forward, 2x that backward
The per-block AdaLN and timestep linears act once per sample, not per token, and are left out.
MFU = model FLOPs / (step time x peak dense bf16 FLOP/s of the GPU).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12), matched below first
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}
_PCIE_OVERRIDES = {"H100 PCIe": 756e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in {**_PCIE_OVERRIDES, **PEAK_BF16_FLOPS}.items():
        if key in name:
            return value
    return None


def transformer_flops_per_sample(
    transformer_config: Any,
    video_tokens: int,
    lora_rank: int | None,
    lora_targets: tuple[str, ...] = (),
    full_finetune: bool = False,
) -> float:
    """Model FLOPs of one forward + backward for one sample (see the module docstring)."""
    cfg = dict(transformer_config)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    dim = heads * head_dim
    n = video_tokens + cfg.get("max_text_seq_length", 226)
    ff_inner = 4 * dim  # diffusers FeedForward default mult=4
    linear_shapes = {"to_q": (dim, dim), "to_k": (dim, dim), "to_v": (dim, dim), "to_out.0": (dim, dim),
                     "ff.net.0.proj": (dim, ff_inner), "ff.net.2": (ff_inner, dim)}
    p_lin = layers * sum(i * o for i, o in linear_shapes.values())
    linear = 2 * n * p_lin * (3 if full_finetune else 2)
    attn_fwd = 4 * n * n * dim * layers
    attention = attn_fwd * 3.5
    lora = 0.0
    if lora_rank:
        for target in lora_targets:
            shape = linear_shapes.get(target)
            if shape is not None:
                lora += 3 * 2 * n * lora_rank * (shape[0] + shape[1]) * layers
    return float(linear + attention + lora)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated device memory in GB since the last reset; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def host_peak_rss_gb() -> float:
    """Peak resident memory of this process (GB): the CPU stand-in in the end-of-run summary."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


class MetricsWriter:
    """One JSON object per optimizer step to metrics.jsonl, mirrored to tensorboard / wandb."""

    KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s", "tflops", "mfu",
            "mem_peak_gb")

    def __init__(self, output_dir: Path, report_to: str, run_name: str, config: dict[str, Any],
                 resume_step: int | None) -> None:
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Keep the steps up to the checkpoint; later lines belong to the interrupted run.
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("log.report_to=wandb needs wandb: pip install 'fastcog[wandb]'") from None
            self._wandb = wandb.init(project=run_name, config=config, dir=str(output_dir), resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def log_video(self, tag: str, path: Path, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Video(str(path))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
