"""Checkpoints: atomic save, retention, `latest`, exact resume.

A checkpoint is `checkpoint-<step>/` holding the trainable weights, optimizer, LR schedule,
GradScaler, RNG states and the data position. It is written into a hidden temporary folder
and renamed into place only after every file (and the `COMPLETE` marker) is on disk, so a
folder named `checkpoint-<step>` with a marker is always whole; a run killed mid-save leaves
only a temporary folder that is never taken as valid (and is removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastcog.errors import FastcogError

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


@dataclass
class TrainState:
    """Where training is: enough to continue exactly as if never stopped."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed (the sampler skips these on resume)."""
    samples_seen: int = 0


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _NAME.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FastcogError(
            f"checkpoint.resume_from={resume_from!r} does not exist: give a checkpoint-<step> folder or `latest`"
        )
    if not (path / MARKER).is_file():
        raise FastcogError(f"{path} is not a complete checkpoint (no {MARKER} marker): it was never fully written")
    return path


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    grad_scaler: Any = None,
    limit: int | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, then apply the retention limit."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".tmp-checkpoint-{state.step}"
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": None if grad_scaler is None else grad_scaler.state_dict(),
            "rng": rng_state(),
        },
        tmp / "training_state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    with open(tmp / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if limit is not None:
        for _, old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any, grad_scaler: Any = None
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore optimizer, schedule, scaler and RNG in place; return the state and weights."""
    trainable = load_file(str(path / "trainable.safetensors"))
    blob = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    if grad_scaler is not None and blob["grad_scaler"] is not None:
        grad_scaler.load_state_dict(blob["grad_scaler"])
    set_rng_state(blob["rng"])
    state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
    return state, trainable
