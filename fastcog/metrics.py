"""Per-step metrics: device and host memory, and the sinks (metrics.jsonl, tensorboard, wandb).

The FLOP model and MFU live in fastcog.flops.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcog.errors import ConfigError

# log.report_to -> the command that installs the package its writer imports (module of the same name).
TRACKER_PACKAGES = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def check_tracker_available(report_to: str) -> None:
    """Fail before any output is written when log.report_to names a package that is not installed.

    Looked up, not imported: wandb's import alone takes seconds.
    """
    if report_to not in TRACKER_PACKAGES:
        return
    try:
        found = importlib.util.find_spec(report_to) is not None
    except ValueError:  # a module without a spec in sys.modules: not importable either
        found = False
    if not found:
        other = next(name for name in TRACKER_PACKAGES if name != report_to)
        raise ConfigError(f"log.report_to={report_to} needs the {report_to} package, which is not installed: "
                          f"{TRACKER_PACKAGES[report_to]} (or set log.report_to: {other} or none)")


def animated_gif(frames: np.ndarray, fps: int) -> bytes:
    """Frames [F, H, W, 3] uint8 as an animated GIF: how TensorBoard shows a video (in its Images
    tab). SummaryWriter.add_video would encode the same with moviepy, which is not a dependency
    (without it add_video only prints that it needs it)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
    return buffer.getvalue()


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

            # The checkpoint holds steps 1..resume_step; the interrupted run may have logged past it.
            # purge_step hides every earlier event at or after it, so the first step logged again
            # (resume_step + 1) and all later ones show once; step resume_step itself is kept.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as err:  # installed (check_tracker_available passed) but broken
                raise ConfigError(f"log.report_to=wandb: importing wandb failed ({err}): reinstall it with "
                                  f"{TRACKER_PACKAGES['wandb']} (or set log.report_to: tensorboard or none)") from None
            self._wandb = wandb.init(project=run_name, config=config, dir=str(output_dir), resume="allow")

    def write(self, record: dict[str, Any], group: str = "train") -> None:
        """One metrics.jsonl row; its numbers go to the tracker as `<group>/<key>` (the validation
        loss's rows: group `validation`)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{group}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{group}/{k}": v for k, v in scalars.items()}, step=step)

    def log_video(self, tag: str, path: Path, step: int, gif: bytes | None = None) -> None:
        """A validation video: the mp4 to wandb; to TensorBoard its animated GIF (animated_gif), as
        the image summary add_video writes."""
        if self._tb is not None and gif is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            # The GIF's logical screen size: bytes 6-9 of its header, little-endian.
            width, height = int.from_bytes(gif[6:8], "little"), int.from_bytes(gif[8:10], "little")
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
            self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Video(str(path))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
