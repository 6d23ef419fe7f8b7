"""The training loop: train() -> train_step() -> forward_backward().

Single process for now; the distributed issue adds a parallelize step and sharded
checkpoints around the same loop. Everything the user can get wrong (config, model folder,
data files) is checked before the output directory is touched, so a bad run never damages an
earlier one.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastcog.checkpoint import TrainState, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from fastcog.config import Config, save_config, to_dict, validate_for_variant
from fastcog.data.buckets import BucketBatchSampler
from fastcog.data.cache import CachedDataset, Encoder
from fastcog.data.listfile import Sample, read_dataset
from fastcog.data.prepare import cache_dir_for, prepare
from fastcog.errors import ConfigError, FastcogError
from fastcog.lora import export_lora, inject_lora, load_trainable_state_dict, trainable_state_dict
from fastcog.metrics import (
    MetricsWriter,
    host_peak_rss_gb,
    peak_flops,
    peak_memory_gb,
    transformer_flops_per_sample,
)
from fastcog.models import TORCH_DTYPES, load_components, read_variant
from fastcog.objective import ReferenceObjective, make_objective
from fastcog.optim import build_optimizer
from fastcog.parallel import SINGLE_PROCESS, World
from fastcog.variants import VariantSpec


@dataclass
class RunSummary:
    """What a finished run reports (also returned to callers and tests)."""

    output_dir: Path
    steps: int
    wall_time_s: float
    samples_per_s: float | None
    mem_peak_gb: float | None
    host_peak_rss_gb: float
    export_path: Path | None
    losses: list[float] = field(default_factory=list)
    resumed_from: Path | None = None

    def lines(self) -> list[str]:
        mem = "not measured (CPU)" if self.mem_peak_gb is None else f"{self.mem_peak_gb:.2f} GB"
        thr = "n/a" if self.samples_per_s is None else f"{self.samples_per_s:.3f} samples/s"
        k = max(1, len(self.losses) // 10)
        trend = (f"{sum(self.losses[:k]) / k:.4f} (first {k} steps) -> {sum(self.losses[-k:]) / k:.4f} (last {k})"
                 if self.losses else "no steps run")
        return [
            "fastcog run finished",
            f"  steps          {self.steps}"
            + (f" (resumed from {self.resumed_from.name})" if self.resumed_from else ""),
            f"  loss           {trend}",
            f"  wall time      {self.wall_time_s:.1f} s",
            f"  throughput     {thr}",
            f"  peak device    {mem}",
            f"  peak host RSS  {self.host_peak_rss_gb:.2f} GB",
            f"  output         {self.output_dir}",
            f"  weights        {self.export_path}",
        ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast as the reference runs (fp32 LoRA weights meet low-precision inputs)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


# --------------------------------------------------------------------------------------------
# Inputs: checked before anything is written
# --------------------------------------------------------------------------------------------


def check_inputs(cfg: Config, world: World = SINGLE_PROCESS) -> tuple[VariantSpec, list[Sample]]:
    """Model folder, variant-specific config rules and every data file, before any output.

    The demo's tiny checkpoint and synthetic clips are written here by rank 0 only.
    """
    from fastcog.data.synthetic import make_synthetic_dataset
    from fastcog.models import make_tiny
    from fastcog.parallel import barrier

    d = cfg.data
    if world.is_main:
        if cfg.model.create_tiny and not Path(cfg.model.path).exists():
            make_tiny(cfg.model.create_tiny, cfg.model.path, seed=0, height=d.height, width=d.width,
                      frames=d.num_frames)
            print(f"wrote a tiny random {cfg.model.create_tiny} checkpoint to {cfg.model.path}")
        if d.synthetic_clips:
            make_synthetic_dataset(
                d.data_root, num_clips=d.synthetic_clips, num_frames=max(d.num_frames, 8), height=d.height,
                width=d.width, seed=cfg.train.seed, with_images=d.image_column is not None,
            )
    barrier()
    variant = read_variant(cfg.model.path)
    validate_for_variant(cfg, variant)
    samples = read_dataset(d.data_root, metadata_file=d.metadata_file, caption_column=d.caption_column,
                           video_column=d.video_column, image_column=d.image_column)
    return variant, samples


def prepare_output_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create the output dir; refuse to overwrite an earlier run's checkpoints."""
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.checkpoint.resume_from, out)
    if resume is None and list_checkpoints(out) and cfg.checkpoint.resume_from is None:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds checkpoints of an earlier run: set "
            "checkpoint.resume_from=latest to continue it, or choose a new train.output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out, resume


# --------------------------------------------------------------------------------------------
# Data order: seeded per epoch, resumable mid-epoch
# --------------------------------------------------------------------------------------------


def micro_batches(dataset: CachedDataset, cfg: Config, state: TrainState, device: torch.device,
                  world: World = SINGLE_PROCESS) -> Iterator[dict]:
    """Endless stream of this rank's micro-batches across epochs; updates `state`'s data position.

    One DataLoader for the whole run (its workers persist across epochs); the sampler is
    pointed at the next epoch before each pass.
    """
    sampler = BucketBatchSampler([it.bucket for it in dataset.items], cfg.train.batch_size, cfg.train.seed,
                                 state.epoch, state.batches_in_epoch, world.rank, world.world_size)
    workers = cfg.data.num_workers
    # A private generator: DataLoader otherwise draws its worker base seed from the global
    # RNG at every new iterator, which would shift the noise draws after a resume.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    if len(sampler) + sampler.skip == 0:
        raise FastcogError(
            f"no full batch: {len(dataset)} samples cannot make one global batch of "
            f"{cfg.train.batch_size * world.world_size}; lower train.batch_size or add data"
        )
    while True:
        sampler.epoch, sampler.skip = state.epoch, state.batches_in_epoch
        for batch in loader:
            state.batches_in_epoch += 1
            state.samples_seen += next(iter(batch.values())).shape[0] * world.world_size
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        state.epoch += 1
        state.batches_in_epoch = 0


# --------------------------------------------------------------------------------------------
# Model, optimizer
# --------------------------------------------------------------------------------------------


def build_transformer(cfg: Config, device: torch.device, tokens_per_sample: int,
                      ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Frozen weights in the compute dtype (SFT: fp32 master weights), adapters in fp32, then
    the fast path (kernels, attention, FP8, activation checkpointing, compile) as configured.

    tokens_per_sample: the largest video token count of any bucket (sizes the checkpointing
    policy for `auto`).
    """
    from fastcog.fast import apply_fast_path

    sft = cfg.model.training_type == "sft"
    comps = load_components(cfg.model.path, "fp32" if sft else cfg.model.dtype, parts=("transformer",))
    transformer = comps.transformer
    if sft:
        transformer.requires_grad_(True)
        params = list(transformer.parameters())
    else:
        params = inject_lora(transformer, cfg.lora)
    transformer.to(device).train()
    apply_fast_path(transformer, cfg, device, tokens_per_sample=tokens_per_sample)
    return transformer, params


def make_encoder_factory(cfg: Config, device: torch.device, variant: VariantSpec) -> Callable[[], Encoder]:
    """Loads the VAE and T5 only when something actually needs encoding."""

    def make() -> Encoder:
        comps = load_components(cfg.model.path, cfg.model.dtype, parts=("vae", "text_encoder", "tokenizer"))
        return Encoder(comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer,
                       variant.max_text_seq_length, device, cfg.data.vae_slicing, cfg.data.vae_tiling)

    return make


def prepare_dataset(cfg: Config, samples: list[Sample], variant: VariantSpec, device: torch.device,
                    world: World = SINGLE_PROCESS) -> CachedDataset:
    """Cache every sample (encoding what is missing) and return the training dataset."""
    result = prepare(cfg, samples, variant.is_i2v, make_encoder_factory(cfg, device, variant), world,
                     show_progress=cfg.log.progress_bar and world.is_main)
    if world.is_main:
        print(result.summary(cache_dir_for(cfg)))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the encoders are gone; give their memory back before training
    return CachedDataset(result.items, TORCH_DTYPES[cfg.model.dtype])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class StepWork:
    """What one optimizer step computed, for the throughput metrics."""

    samples: int = 0
    video_tokens: int = 0
    flops: float = 0.0


class WorkCounter:
    """Model FLOPs and tokens of a micro-batch (buckets make them vary batch to batch)."""

    def __init__(self, transformer_config: Any, variant: VariantSpec, cfg: Config) -> None:
        self.config, self.variant, self.cfg = transformer_config, variant, cfg
        self._flops: dict[int, float] = {}

    def __call__(self, batch: dict[str, torch.Tensor], work: StepWork) -> None:
        latents = batch["latents"]
        tokens = video_tokens(latents.shape[1:], self.variant)
        if tokens not in self._flops:
            sft = self.cfg.model.training_type == "sft"
            self._flops[tokens] = transformer_flops_per_sample(
                self.config, tokens, None if sft else self.cfg.lora.rank, self.cfg.lora.target_modules, sft)
        work.samples += latents.shape[0]
        work.video_tokens += latents.shape[0] * tokens
        work.flops += latents.shape[0] * self._flops[tokens]


def forward_backward(objective: ReferenceObjective, transformer: torch.nn.Module, batch: dict, cfg: Config,
                     device: torch.device, grad_scaler: Any) -> float:
    with autocast(device, cfg.model.dtype):
        loss = objective(transformer, batch)
    scaled = loss / cfg.train.gradient_accumulation_steps
    (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
    return float(loss.detach())


def train_step(objective: ReferenceObjective, transformer: torch.nn.Module, params: list, batches: Iterator,
               optimizer: Any, lr_scheduler: Any, grad_scaler: Any, cfg: Config, device: torch.device,
               count: WorkCounter) -> tuple[float, float, StepWork]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean loss, pre-clip norm, work)."""
    losses, work = [], StepWork()
    for _ in range(cfg.train.gradient_accumulation_steps):
        batch = next(batches)
        count(batch, work)
        losses.append(forward_backward(objective, transformer, batch, cfg, device, grad_scaler))
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses), grad_norm, work


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.train.train_steps is not None:
        return cfg.train.train_steps
    return max(1, math.ceil(cfg.train.train_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


def train(cfg: Config) -> RunSummary:
    """Run a whole training job described by `cfg`; returns the end-of-run summary."""
    t_start = time.perf_counter()
    variant, samples = check_inputs(cfg)
    out, resume_path = prepare_output_dir(cfg)
    device = pick_device()
    seed_everything(cfg.train.seed)

    dataset = prepare_dataset(cfg, samples, variant, device)
    # In the loop: the scheduler always; the VAE for I2V (the image is encoded every step) and
    # for validation; T5 only for validation.
    parts = ["scheduler"]
    if variant.is_i2v or cfg.validation.every_steps:
        parts.append("vae")
    if cfg.validation.every_steps:
        parts += ["text_encoder", "tokenizer"]
    comps = load_components(cfg.model.path, cfg.model.dtype, parts=tuple(parts))
    if comps.vae is not None:
        comps.vae.to(device)

    bucket_of = [it.bucket for it in dataset.items]
    max_tokens = max_video_tokens(dataset, variant)
    transformer, params = build_transformer(cfg, device, max_tokens)
    objective = make_objective(cfg, variant, comps.scheduler, comps.vae)
    steps = total_steps(cfg, len(BucketBatchSampler(bucket_of, cfg.train.batch_size, cfg.train.seed)))
    optimizer, lr_scheduler = build_optimizer(cfg, params, steps)
    grad_scaler = torch.amp.GradScaler(device.type) if cfg.model.dtype == "fp16" else None

    state = TrainState()
    if resume_path is not None:
        state, weights = load_checkpoint(resume_path, optimizer, lr_scheduler, grad_scaler)
        load_trainable_state_dict(transformer, weights)
        print(f"resumed from {resume_path} at step {state.step}")
    else:
        seed_everything(cfg.train.seed)  # the same draws whether or not earlier setup used the RNG
    metrics = MetricsWriter(out, cfg.log.report_to, cfg.log.tracker_name, to_dict(cfg),
                            resume_step=state.step if resume_path else None)

    count = WorkCounter(transformer.config, variant, cfg)
    peak = peak_flops(device)
    batches = micro_batches(dataset, cfg, state, device)
    losses: list[float] = []
    step_times: list[float] = []
    step_samples: list[int] = []
    bar = tqdm(total=steps, initial=state.step, desc="training", unit="step", disable=not cfg.log.progress_bar,
               dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while state.step < steps:
        t0 = time.perf_counter()
        loss, grad_norm, work = train_step(objective, transformer, params, batches, optimizer, lr_scheduler,
                                           grad_scaler, cfg, device, count)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        state.step += 1
        losses.append(loss)
        step_times.append(dt)
        lr = lr_scheduler.get_last_lr()[0]
        step_samples.append(work.samples)
        tflops = work.flops / dt / 1e12
        metrics.write({
            "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
            "samples_per_s": work.samples / dt, "tokens_per_s": work.video_tokens / dt,
            "tflops": tflops, "mfu": None if peak is None else tflops * 1e12 / peak,
            "mem_peak_gb": peak_memory_gb(device),
        })
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{grad_norm:.3f}")
        last = state.step == steps
        every = cfg.checkpoint.every_steps
        if (every and state.step % every == 0) or (last and cfg.checkpoint.save_final):
            save_checkpoint(out, state, trainable_state_dict(transformer), optimizer, lr_scheduler, grad_scaler,
                            cfg.checkpoint.limit)
        if cfg.validation.every_steps and state.step % cfg.validation.every_steps == 0:
            from fastcog.validation import render_validation

            for path in render_validation(cfg, comps, transformer, out, state.step, device):
                metrics.log_video(f"validation/{path.stem}", path, state.step)
    bar.close()
    metrics.close()

    if cfg.model.training_type == "sft":
        export_path = out / "transformer"
        transformer.save_pretrained(export_path)
    else:
        export_path = export_lora(transformer, cfg.lora, out / "lora", variant.is_i2v)
    first = 1 if len(step_times) > 1 else 0  # the first step includes one-off warm-up
    summary = RunSummary(
        output_dir=out, steps=state.step, wall_time_s=time.perf_counter() - t_start,
        samples_per_s=sum(step_samples[first:]) / sum(step_times[first:]) if step_times else None,
        mem_peak_gb=peak_memory_gb(device), host_peak_rss_gb=host_peak_rss_gb(),
        export_path=export_path, losses=losses, resumed_from=resume_path,
    )
    return summary


def max_video_tokens(dataset: CachedDataset, variant: VariantSpec) -> int:
    """The largest per-sample video token count over the dataset's buckets (one item read each)."""
    first_of_bucket: dict[int, int] = {}
    for i, item in enumerate(dataset.items):
        first_of_bucket.setdefault(item.bucket, i)
    return max(video_tokens(dataset[i]["latents"].shape, variant) for i in first_of_bucket.values())


def video_tokens(latent_shape: torch.Size, variant: VariantSpec) -> int:
    """Transformer video tokens for one sample with cached latents of shape [C, F, H, W]."""
    _, f, h, w = latent_shape
    if variant.patch_size_t:
        f = math.ceil(f / variant.patch_size_t)
    return f * (h // variant.patch_size) * (w // variant.patch_size)
