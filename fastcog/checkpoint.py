"""Checkpoints: torch.distributed.checkpoint (DCP), atomic, retention, `latest`, exact resume.

A checkpoint is a folder `checkpoint-<step>/`:

  .metadata, __<rank>_0.distcp   DCP: the trainable weights and the optimizer state, keyed by
                                 parameter name, each rank writing its own shards
  training_state.pt              LR schedule, GradScaler, RNG states (rank 0's: every rank
                                 holds the same RNG state by construction); the optimizer
                                 state here instead for optim.cpu_offload (optimizer_by_name)
  trainer_state.json             TrainState: step and data position
  COMPLETE                       written last

DCP stores each tensor with its global shape, so a checkpoint written by N ranks (FSDP
shards, DDP or one process) loads into any other number of ranks: `load_checkpoint` reads
exactly the pieces each rank's shards need.

It is written into a hidden temporary folder and renamed into place by rank 0 only after every
rank's files (and the `COMPLETE` marker) are on disk, so a folder named `checkpoint-<step>`
with a marker is always whole; a run killed mid-save leaves only a temporary folder that is
never taken as valid (and is removed by the next save). With checkpoint.async_save the files
are written in a background thread while training goes on; the marker and the rename wait for
that write to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastcog.checkpoint_guard import check_before_save, write_errors_named
from fastcog.errors import FastcogError
from fastcog.parallel import World, barrier
from fastcog.resume import write_run_record

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"
DCP_METADATA = ".metadata"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainState:
    """Where training is: enough to continue exactly as if never stopped."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batches_in_epoch: int = 0
    """Global batches of `epoch` already consumed (the sampler skips these on resume; the same
    count whatever the number of ranks)."""
    samples_seen: int = 0


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        # This rank's device only: every rank draws the same numbers on its own GPU, and touching
        # the other GPUs would create a context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _NAME.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was written at (its trainer_state.json; the name otherwise)."""
    state = path / TRAINER_STATE
    if state.is_file():
        return int(json.loads(state.read_text())["step"])
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else 0


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


# --------------------------------------------------------------------------------------------
# State dicts: by parameter name, trainable tensors only
# --------------------------------------------------------------------------------------------


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights come from model.path, never from a checkpoint. strict=False on load
    # because the model state holds only the trainable tensors (their names are checked here).
    return StateDictOptions(ignore_frozen_params=True, strict=False, **kwargs)


def optimizer_by_name(optimizer: Any) -> bool:
    """Whether the optimizer's state can be saved per parameter name (through DCP).

    Every torch.optim.Optimizer can, except torchao's CPUOffloadOptimizer (optim.cpu_offload):
    it holds no `state` of its own but inner optimizers over host copies of the parameters.
    It runs only where every rank holds whole parameters (one process, DDP), so its
    state_dict() is saved whole, from rank 0, instead.
    """
    return isinstance(getattr(optimizer, "state", None), dict)


def _dcp_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """{"model": trainable tensors, "optim": optimizer state}, keyed by parameter name.

    Under FSDP the values are DTensor shards; names, not parameter ids, make them loadable
    with another number of ranks. An optimizer that has not stepped yet gets its state
    created here (a step with zero gradients and lr 0, by torch) so that loading has targets.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer_by_name(optimizer):
        return {"model": get_model_state_dict(model, options=_options())}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every save and load without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A checkpoint whose DCP files are still being written (async save)."""

    tmp: Path
    final: Path
    future: Future


class Checkpointer:
    """Writes checkpoint-<step>/ folders for every rank of the run; rank 0 owns the folder names.

    Every rank calls save() at the same steps (it is collective) and wait() before the end.
    """

    def __init__(self, output_dir: Path, world: World, limit: int | None = None, async_save: bool = False,
                 run_record: dict[str, Any] | None = None) -> None:
        self.output_dir, self.world, self.limit, self.async_save = output_dir, world, limit, async_save
        self.run_record = run_record
        self._pending: _Pending | None = None
        self._group = None
        if async_save and world.distributed:
            # The background writer's collectives get their own (CPU) group, so they never
            # interleave with the training collectives on the default group.
            self._group = dist.new_group(backend="gloo")

    def save(self, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
             grad_scaler: Any = None) -> Path:
        """Checkpoint the current state (sync: on disk when this returns; async: staged in memory)."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.output_dir / f"checkpoint-{state.step}"
        tmp = self.output_dir / f".tmp-checkpoint-{state.step}"
        tensors = _dcp_state(model, optimizer)
        needed = check_before_save(tensors, state.step, self.output_dir, self.world.is_main)
        if self.world.is_main:
            for stale in self.output_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()  # the folder exists (and no stale one will be removed) before any rank writes
        with write_errors_named(tmp, needed):
            if self.world.is_main:
                _write_training_state(tmp, state, optimizer, lr_scheduler, grad_scaler)
                if self.run_record is not None:
                    write_run_record(tmp, self.run_record)
            if self.async_save:
                with _quiet_single_process():
                    result = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group,
                                            no_dist=not self.world.distributed)
                # torch >= 2.9 may answer with (staging, upload) futures; the upload is what matters.
                future = getattr(result, "upload_completion", result)
                self._pending = _Pending(tmp, final, future)
            else:
                with _quiet_single_process():
                    dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not self.world.distributed)
                self._finalize(tmp, final)
        return final

    def poll(self) -> None:
        """Finish an async save whose files are written (call once per step; cheap)."""
        if self._pending is not None and self._pending.future.done():
            self.wait()

    def wait(self) -> None:
        """Block until a pending async save is written, then mark it complete."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with write_errors_named(pending.tmp, None):
                pending.future.result()  # raises if the write failed
                self._finalize(pending.tmp, pending.final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Rank 0: marker, rename into place, retention. DCP's save finishes on rank 0 (it writes
        .metadata) only after every rank reported its files written, so no barrier is needed."""
        if not self.world.is_main:
            return
        with open(tmp / MARKER, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.limit is not None:
            for _, old in list_checkpoints(self.output_dir)[:-self.limit]:
                shutil.rmtree(old, ignore_errors=True)


def _write_training_state(folder: Path, state: TrainState, optimizer: Any, lr_scheduler: Any,
                          grad_scaler: Any) -> None:
    torch.save(
        {
            "optimizer": None if optimizer_by_name(optimizer) else optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": None if grad_scaler is None else grad_scaler.state_dict(),
            "rng": rng_state(),
        },
        folder / TRAINING_STATE,
    )
    (folder / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _checkpoint_keys(path: Path, prefix: str) -> set[str]:
    """Names stored under `prefix` ("model." ...) in a DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / DCP_METADATA).is_file():
        raise FastcogError(
            f"{path} has no {DCP_METADATA}: it is not a torch.distributed.checkpoint folder (checkpoints of "
            "fastcog before distributed training stored trainable.safetensors; retrain, or resume with that version)"
        )
    meta = FileSystemReader(str(path)).read_metadata()
    return {k[len(prefix):] for k in meta.state_dict_metadata if k.startswith(prefix)}


def _check_names(path: Path, stored: set[str], wanted: set[str]) -> None:
    missing, unexpected = wanted - stored, stored - wanted
    if missing or unexpected:
        raise FastcogError(
            f"{path} does not match the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); was it saved with another "
            "lora.rank / lora.target_modules / model.training_type?"
        )


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                    grad_scaler: Any = None) -> TrainState:
    """Restore trainable weights, optimizer, schedule, scaler and RNG in place (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    stored = _checkpoint_keys(path, "model.")
    tensors = _dcp_state(model, optimizer)
    _check_names(path, stored, set(tensors["model"]))
    blob = torch.load(path / TRAINING_STATE, weights_only=False)
    if ("optim" in tensors) != (blob["optimizer"] is None):
        raise FastcogError(f"{path} was saved with another optim.cpu_offload setting: resume with the same one")
    with _quiet_single_process():
        dcp.load(tensors, checkpoint_id=str(path), no_dist=not (dist.is_available() and dist.is_initialized()))
    if "optim" in tensors:
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"],
                       options=_options())
    else:
        set_model_state_dict(model, tensors["model"], options=_options())
        optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    if grad_scaler is not None and blob["grad_scaler"] is not None:
        grad_scaler.load_state_dict(blob["grad_scaler"])
    set_rng_state(blob["rng"])
    return TrainState(**json.loads((path / TRAINER_STATE).read_text()))


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights as whole CPU tensors by parameter name, in this process alone
    (whatever number of ranks wrote it): for inspection and tests."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _checkpoint_keys(path, "model.")  # the format check
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in meta.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with _quiet_single_process():
        dcp.load({"model": weights}, checkpoint_id=str(path), no_dist=True)
    return weights
