"""The lines a run prints before its first step: what is about to be trained, and how.

One block, one fact per row, printed once everything it describes has been decided (data
counted, model built, checkpoint loaded), so it replaces the separate lines the steps used to
print as they went (the data line, fastcog.build's fast-path report, the strategy choice, the
resume line). Warnings still print when they arise: they must be seen before a long load.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastcog.config import Config
from fastcog.data.buckets import Bucket, BucketBatchSampler

# fastcog.build's report lines are "topic: text"; a topic it has no row for keeps its own name.
ROW_OF_TOPIC = {"activation checkpointing": "checkpointing", "lora kernel": "lora kernel"}


@dataclass
class RunStart:
    """Everything the banner says, gathered by the trainer."""

    cfg: Config
    variant: str
    sampler: BucketBatchSampler
    """This rank's sampler over the whole dataset (the counts are the same on every rank)."""
    bucket_shapes: Sequence[Bucket]
    steps: int
    start_step: int
    resumed_from: Path | None
    trainable: int
    """Trainable parameter count (global: a sharded parameter counts whole)."""
    world_size: int
    strategy: str
    device: torch.device
    build_lines: list[str] = field(default_factory=list)
    """fastcog.build's report: "attention: ...", "activation checkpointing: ...", "fp8: ..." ..."""
    strategy_choice: str | None = None
    """`parallel.strategy: auto`'s choice and why (fastcog.plan_report.RunCheck); None when not auto."""
    validation: str | None = None
    """The held-out set and its validation loss (fastcog.val_loss.describe); None: nothing held out."""


def banner(s: RunStart) -> list[str]:
    cfg = s.cfg
    kind = ("full fine-tuning" if cfg.model.training_type == "sft"
            else f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)}")
    rows: dict[str, str] = {
        "data": s.sampler.describe().removeprefix("data: "),
        "buckets": _buckets(s.sampler.bucket_of, s.bucket_shapes),
        **({"validation": s.validation} if s.validation else {}),
        "trainable": f"{_count(s.trainable)} parameters ({kind})",
        "steps": _steps(s),
        "precision": _precision(cfg),
        "parallel": _parallel(s),
    }
    topics = dict(_topic(line) for line in s.build_lines)
    rows["attention"] = topics.pop("attention", f"{cfg.fast.attention}: diffusers' default processor "
                                                "(fast.attention: reference)")
    rows["checkpointing"] = _checkpointing(cfg, topics.pop("activation checkpointing", None))
    rows.update({ROW_OF_TOPIC.get(t, t): text for t, text in topics.items()})  # fp8, lora kernel, compile
    width = max(map(len, rows)) + 2
    return [f"fastcog train: {s.variant} from {cfg.model.path}"] + [f"  {k:<{width}}{v}" for k, v in rows.items()]


def _topic(line: str) -> tuple[str, str]:
    topic, _, text = line.partition(": ")
    return topic, text


def _buckets(bucket_of: Sequence[int], shapes: Sequence[Bucket]) -> str:
    """Each used bucket's shape and, when there are several, its sample count."""
    sizes = Counter(bucket_of)
    if len(sizes) == 1:
        return "x".join(map(str, shapes[next(iter(sizes))])) + " (frames x height x width)"
    used = [f"{'x'.join(map(str, shapes[b]))}: {sizes[b]}" for b in sorted(sizes)]
    return ", ".join(used) + " samples (frames x height x width)"


def _steps(s: RunStart) -> str:
    accumulation = s.cfg.train.gradient_accumulation_steps
    per_epoch = s.sampler.counts().batches / accumulation
    line = (f"{s.steps} in total, {per_epoch:.3g} per epoch ({s.steps / per_epoch:.3g} epochs); global batch "
            f"{s.cfg.train.batch_size * s.world_size * accumulation} = {s.cfg.train.batch_size} per rank x "
            f"{s.world_size} rank(s) x {accumulation} accumulated")
    if s.resumed_from is not None:
        line += f"; resuming at step {s.start_step} from {s.resumed_from}"
    return line


def _precision(cfg: Config) -> str:
    dtype = cfg.model.dtype
    if dtype == "fp32":
        return "fp32 throughout (no autocast)"
    if cfg.model.training_type == "sft":
        line = f"fp32 weights, gradients and optimizer; forward under {dtype} autocast"
    else:
        line = f"frozen weights stored in {dtype}, forward under {dtype} autocast; LoRA weights, gradients " \
               "and optimizer in fp32"
    return line + ("; fp16 loss scaling" if dtype == "fp16" else "")


def _parallel(s: RunStart) -> str:
    where = s.device.type if s.device.type != "cuda" else torch.cuda.get_device_name(s.device)
    if s.world_size == 1:
        return f"1 process on {where}"
    line = f"{s.strategy} over {s.world_size} ranks on {where}"
    if s.strategy == "fsdp" and s.cfg.parallel.replicate_degree > 1:
        line += f" (HSDP: {s.cfg.parallel.replicate_degree} replicas)"
    return line + (f"; {s.strategy_choice}" if s.strategy_choice else "")


def _checkpointing(cfg: Config, built: str | None) -> str:
    """built: fastcog.build's line (fast path); None on the reference path, which has none."""
    policy = cfg.train.activation_checkpointing
    if built is None:
        what = "diffusers' gradient checkpointing on every block" if policy == "full" else "no recompute"
        return f"{policy}: {what} (train.activation_checkpointing)"
    return built if policy == "auto" else f"{built} (train.activation_checkpointing)"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)
