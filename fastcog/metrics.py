"""Per-step metrics: device and host memory, and the sinks (metrics.jsonl, tensorboard, wandb).

The FLOP model and MFU live in fastcog.flops.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch


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
