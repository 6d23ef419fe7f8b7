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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastcog.checkpoint import TrainState, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from fastcog.config import Config, save_config, to_dict, validate_for_variant
from fastcog.data.cache import CachedDataset, CacheSpec, Encoder, model_fingerprint, prepare_cache
from fastcog.data.listfile import Sample, read_list_dataset
from fastcog.errors import ConfigError
from fastcog.lora import export_lora, inject_lora, load_trainable_state_dict, trainable_state_dict
from fastcog.metrics import (
    MetricsWriter,
    host_peak_rss_gb,
    peak_flops,
    peak_memory_gb,
    transformer_flops_per_sample,
)
from fastcog.models import TORCH_DTYPES, Components, load_components, read_variant
from fastcog.objective import ReferenceObjective
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


def check_inputs(cfg: Config) -> tuple[VariantSpec, list[Sample]]:
    """Model folder, variant-specific config rules and every data file, before any output."""
    from fastcog.data.synthetic import make_synthetic_dataset
    from fastcog.models import make_tiny

    if cfg.model.create_tiny and not Path(cfg.model.path).exists():
        make_tiny(cfg.model.create_tiny, cfg.model.path, seed=0, height=cfg.data.height, width=cfg.data.width,
                  frames=cfg.data.num_frames)
        print(f"wrote a tiny random {cfg.model.create_tiny} checkpoint to {cfg.model.path}")
    variant = read_variant(cfg.model.path)
    validate_for_variant(cfg, variant)
    d = cfg.data
    if d.synthetic_clips:
        make_synthetic_dataset(
            d.data_root, num_clips=d.synthetic_clips, num_frames=max(d.num_frames, 8), height=d.height,
            width=d.width, seed=cfg.train.seed, with_images=variant.is_i2v and d.image_column is not None,
        )
    samples = read_list_dataset(d.data_root, d.caption_column, d.video_column, d.image_column)
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


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches, the permutation a function of (seed, epoch) only, so a resumed run
    sees exactly the batches an uninterrupted one would; `skip` drops already-used batches."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 0, skip: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.skip = epoch, skip

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip :]

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size) - self.skip


def micro_batches(dataset: CachedDataset, cfg: Config, state: TrainState, device: torch.device) -> Iterator[dict]:
    """Endless stream of micro-batches across epochs; updates `state`'s data position."""
    pin = cfg.data.pin_memory and device.type == "cuda"
    while True:
        sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, state.epoch,
                                    state.batches_in_epoch)
        # A private generator: DataLoader otherwise draws its worker base seed from the global
        # RNG at every new iterator, which would shift the noise draws after a resume.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.train.seed + state.epoch),
            persistent_workers=False,
        )
        for batch in loader:
            state.batches_in_epoch += 1
            state.samples_seen += next(iter(batch.values())).shape[0]
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        state.epoch += 1
        state.batches_in_epoch = 0


# --------------------------------------------------------------------------------------------
# Model, optimizer
# --------------------------------------------------------------------------------------------


def build_transformer(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Frozen weights in the compute dtype (SFT: fp32 master weights), adapters in fp32."""
    sft = cfg.model.training_type == "sft"
    comps = load_components(cfg.model.path, "fp32" if sft else cfg.model.dtype, parts=("transformer",))
    transformer = comps.transformer
    if sft:
        transformer.requires_grad_(True)
        params = list(transformer.parameters())
    else:
        params = inject_lora(transformer, cfg.lora)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    return transformer, params


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[o.name]
    optimizer = cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, step_rules=o.lr_step_rules, num_warmup_steps=o.lr_warmup_steps,
        num_training_steps=total_steps, num_cycles=o.lr_num_cycles, power=o.lr_power,
    )
    return optimizer, lr_scheduler


def encode_dataset(cfg: Config, samples: list[Sample], comps: Components, device: torch.device) -> CachedDataset:
    """Encode every sample into the cache (reusing what is there) and return the dataset."""
    d = cfg.data
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path(d.data_root) / ".fastcog_cache"
    spec = CacheSpec(model_fingerprint(Path(cfg.model.path)), cfg.model.dtype, d.num_frames, d.height, d.width)
    encoder = Encoder(comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer,
                      comps.variant.max_text_seq_length, device, d.vae_slicing, d.vae_tiling)
    items, counts = prepare_cache(samples, cache_dir, spec, encoder, need_images=comps.variant.is_i2v,
                                  show_progress=cfg.log.progress_bar)
    print(f"cache: {counts['encoded']} encoded, {counts['reused']} reused, in {cache_dir}")
    return CachedDataset(items, TORCH_DTYPES[cfg.model.dtype])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def forward_backward(objective: ReferenceObjective, transformer: torch.nn.Module, batch: dict, cfg: Config,
                     device: torch.device, grad_scaler: Any) -> float:
    with autocast(device, cfg.model.dtype):
        loss = objective(transformer, batch)
    scaled = loss / cfg.train.gradient_accumulation_steps
    (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
    return float(loss.detach())


def train_step(objective: ReferenceObjective, transformer: torch.nn.Module, params: list, batches: Iterator,
               optimizer: Any, lr_scheduler: Any, grad_scaler: Any, cfg: Config, device: torch.device
               ) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean loss, pre-clip norm)."""
    losses = [forward_backward(objective, transformer, next(batches), cfg, device, grad_scaler)
              for _ in range(cfg.train.gradient_accumulation_steps)]
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
    return sum(losses) / len(losses), grad_norm


def total_steps(cfg: Config, num_samples: int) -> int:
    if cfg.train.train_steps is not None:
        return cfg.train.train_steps
    batches_per_epoch = math.ceil(num_samples / cfg.train.batch_size)
    return max(1, math.ceil(cfg.train.train_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


def train(cfg: Config) -> RunSummary:
    """Run a whole training job described by `cfg`; returns the end-of-run summary."""
    t_start = time.perf_counter()
    variant, samples = check_inputs(cfg)
    out, resume_path = prepare_output_dir(cfg)
    device = pick_device()
    seed_everything(cfg.train.seed)

    need_vae_in_loop = variant.is_i2v or cfg.validation.every_steps > 0
    comps = load_components(cfg.model.path, cfg.model.dtype, parts=("vae", "text_encoder", "tokenizer", "scheduler"))
    dataset = encode_dataset(cfg, samples, comps, device)
    if not cfg.validation.every_steps:
        comps.text_encoder = comps.tokenizer = None  # T5 is only needed again to render validation videos
    if not need_vae_in_loop:
        comps.vae = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    transformer, params = build_transformer(cfg, device)
    objective = ReferenceObjective(variant, comps.scheduler, comps.vae, cfg.model.i2v_image_scale)
    steps = total_steps(cfg, len(dataset))
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

    sample_latents = dataset[0]["latents"]
    tokens = video_tokens(sample_latents.shape, variant)
    samples_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    flops_per_step = samples_per_step * transformer_flops_per_sample(
        transformer.config, tokens, None if cfg.model.training_type == "sft" else cfg.lora.rank,
        cfg.lora.target_modules, full_finetune=cfg.model.training_type == "sft",
    )
    peak = peak_flops(device)
    batches = micro_batches(dataset, cfg, state, device)
    losses: list[float] = []
    step_times: list[float] = []
    bar = tqdm(total=steps, initial=state.step, desc="training", unit="step", disable=not cfg.log.progress_bar,
               dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while state.step < steps:
        t0 = time.perf_counter()
        loss, grad_norm = train_step(objective, transformer, params, batches, optimizer, lr_scheduler,
                                     grad_scaler, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        state.step += 1
        losses.append(loss)
        step_times.append(dt)
        lr = lr_scheduler.get_last_lr()[0]
        tflops = flops_per_step / dt / 1e12
        metrics.write({
            "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
            "samples_per_s": samples_per_step / dt, "tokens_per_s": samples_per_step * tokens / dt,
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
    timed = step_times[1:] or step_times  # the first step includes one-off warm-up
    summary = RunSummary(
        output_dir=out, steps=state.step, wall_time_s=time.perf_counter() - t_start,
        samples_per_s=samples_per_step / (sum(timed) / len(timed)) if timed else None,
        mem_peak_gb=peak_memory_gb(device), host_peak_rss_gb=host_peak_rss_gb(),
        export_path=export_path, losses=losses, resumed_from=resume_path,
    )
    return summary


def video_tokens(latent_shape: torch.Size, variant: VariantSpec) -> int:
    """Transformer video tokens for one sample with cached latents of shape [C, F, H, W]."""
    _, f, h, w = latent_shape
    if variant.patch_size_t:
        f = math.ceil(f / variant.patch_size_t)
    return f * (h // variant.patch_size) * (w // variant.patch_size)
