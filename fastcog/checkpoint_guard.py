"""What must hold before and while a checkpoint is written: finite weights, room on the disk,
and a failed write that becomes one line and leaves the earlier checkpoints as they were."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastcog.errors import FastcogError
from fastcog.optim import held_bytes
from fastcog.parallel import all_gather_objects

# Words of the errors torch's writers raise for a failed write (DCP wraps the OSError of its
# writer threads, and torch.save's zip writer reports it as an inline_container error).
_WRITE_FAILURES = ("No space left", "Disk quota", "inline_container", "file write failed", "Permission denied",
                   "Read-only file system", "File too large")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _nonfinite(model_state: dict[str, Any], step: int) -> str | None:
    bad = [name for name, t in model_state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())]
    if not bad:
        return None
    return (f"step {step}: {len(bad)} trainable tensors hold NaN or inf (e.g. {bad[0]}); no checkpoint was written "
            "and the earlier ones are intact: lower optim.lr, then resume from the last checkpoint")


def _no_room(folder: Path, needed: int) -> str | None:
    free = shutil.disk_usage(folder).free
    if free >= needed * 1.05 + (64 << 20):  # the tensors, DCP's metadata and the small files
        return None
    return (f"not enough space for a checkpoint in {folder}: it needs about {_size(needed)}, {_size(free)} is free; "
            "free space, lower checkpoint.limit or move train.output_dir, then resume (earlier checkpoints are intact)")


def check_before_save(tensors: dict[str, Any], step: int, folder: Path, is_main: bool) -> int:
    """Collective: every rank raises the same error, or none does (a rank that raised alone would
    leave the others waiting in the save). Returns the checkpoint's size in bytes."""
    gathered = all_gather_objects((held_bytes(tensors), _nonfinite(tensors["model"], step)))
    needed = sum(size for size, _ in gathered)
    problem = next((p for _, p in gathered if p), None) or (_no_room(folder, needed) if is_main else None)
    problem = all_gather_objects(problem)[0]  # rank 0's answer on the free space, on every rank
    if problem:
        raise FastcogError(problem)
    return needed


@contextlib.contextmanager
def write_errors_named(tmp: Path, needed: int | None) -> Iterator[None]:
    """A failed write (disk full, quota, permissions) removes the partial folder and is one line."""
    try:
        yield
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        if not isinstance(err, OSError) and not any(w in text for w in _WRITE_FAILURES):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free
        size = f"it needs about {_size(needed)}, " if needed else ""
        raise FastcogError(
            f"could not write {tmp.name.removeprefix('.tmp-')} in {tmp.parent} ({text.splitlines()[0][:160]}); "
            f"{size}{_size(free)} is free there: free space or move train.output_dir, then resume (earlier "
            "checkpoints are intact)"
        ) from None
