"""The training loop: train() -> train_step() -> forward_backward().

One process, or one per GPU under torchrun (fastcog.parallel: FSDP2, DDP). Every rank runs
the same loop on its slice of each global batch; rank 0 alone writes config, metrics, the
progress bar, checkpoint folder names and the exported weights. Everything the user can get
wrong (config, model folder, data files) is checked before the output directory is touched,
so a bad run never damages an earlier one.
"""

from __future__ import annotations

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

from fastcog.checkpoint import Checkpointer, TrainState, list_checkpoints, load_checkpoint, resolve_resume
from fastcog.config import Config, save_config, to_dict, validate_for_variant
from fastcog.data.buckets import BucketBatchSampler
from fastcog.data.cache import CachedDataset, Encoder
from fastcog.data.listfile import Sample, read_dataset
from fastcog.data.prepare import cache_dir_for, prepare
from fastcog.errors import ConfigError, FastcogError
from fastcog.fast import check_fast_path
from fastcog.lora import LORA_WEIGHTS_NAME, export_lora, inject_lora
from fastcog.metrics import (
    MetricsWriter,
    host_peak_rss_gb,
    peak_flops,
    peak_memory_gb,
    transformer_flops_per_sample,
)
from fastcog.models import TORCH_DTYPES, load_components, read_variant, set_vae_memory_options
from fastcog.objective import Objective, make_objective
from fastcog.optim import build_optimizer, check_optimizer_available
from fastcog.parallel import (
    SINGLE_PROCESS,
    Parallel,
    World,
    barrier,
    check_optimizer,
    device_for,
    grad_scaler_for,
    init_distributed,
    parallelize,
    resolve_strategy,
)
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
    world_size: int = 1
    strategy: str = "none"

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
            f"  processes      {self.world_size}" + (f" ({self.strategy})" if self.world_size > 1 else ""),
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


# --------------------------------------------------------------------------------------------
# Inputs: checked before anything is written
# --------------------------------------------------------------------------------------------


def check_inputs(cfg: Config, world: World = SINGLE_PROCESS) -> tuple[VariantSpec, list[Sample]]:
    """Model folder, variant-specific config rules and every data file, before any output.

    The demo's tiny checkpoint and synthetic clips are written here by rank 0 only.
    """
    from fastcog.data.synthetic import make_synthetic_dataset
    from fastcog.models import make_tiny

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


def prepare_output_dir(cfg: Config, world: World = SINGLE_PROCESS) -> tuple[Path, Path | None]:
    """Create the output dir; refuse to overwrite an earlier run's checkpoints.

    Every rank checks (so all raise the same error, or none does); rank 0 writes.
    """
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.checkpoint.resume_from, out)
    if resume is None and list_checkpoints(out) and cfg.checkpoint.resume_from is None:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds checkpoints of an earlier run: set "
            "checkpoint.resume_from=latest to continue it, or choose a new train.output_dir"
        )
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    barrier()
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


def build_transformer(cfg: Config, device: torch.device, tokens_per_sample: int, *, shards: int = 1,
                      verbose: bool = True) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Frozen weights in the compute dtype (SFT: fp32 master weights), adapters in fp32, then
    the fast path (kernels, attention, FP8, activation checkpointing, compile) as configured.

    tokens_per_sample: the largest video token count of any bucket (sizes the checkpointing
    policy for `auto`); shards: ranks FSDP will shard the weights over. Under FSDP, call
    parallelize() next and take the parameters again: fully_shard replaces them.
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
    apply_fast_path(transformer, cfg, device, tokens_per_sample=tokens_per_sample, shards=shards, verbose=verbose)
    return transformer, params


def make_encoder_factory(cfg: Config, device: torch.device, variant: VariantSpec) -> Callable[[], Encoder]:
    """Loads the VAE and T5 only when something actually needs encoding."""

    def make() -> Encoder:
        comps = load_components(cfg.model.path, cfg.model.dtype, parts=("vae", "text_encoder", "tokenizer"))
        set_vae_memory_options(comps.vae, cfg.data.vae_slicing, cfg.data.vae_tiling)
        return Encoder(comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer,
                       variant.max_text_seq_length, device)

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


def forward_backward(objective: Objective, transformer: torch.nn.Module, batch: dict, cfg: Config,
                     grad_scaler: Any) -> float:
    """One micro-batch. The objective owns the precision: only the transformer forward autocasts."""
    loss = objective(transformer, batch)
    scaled = loss / cfg.train.gradient_accumulation_steps
    (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
    return float(loss.detach())


def train_step(objective: Objective, par: Parallel, params: list, batches: Iterator, optimizer: Any,
               lr_scheduler: Any, grad_scaler: Any, cfg: Config, count: WorkCounter) -> tuple[float, float, StepWork]:
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns (loss averaged over micro-batches and ranks, pre-clip global gradient norm, this
    rank's work). Gradients are reduced across ranks on the last micro-batch only.
    """
    losses, work = [], StepWork()
    accumulation = cfg.train.gradient_accumulation_steps
    for i in range(accumulation):
        batch = next(batches)
        count(batch, work)
        with par.grad_sync(is_last=i == accumulation - 1):
            losses.append(forward_backward(objective, par.forward_module, batch, cfg, grad_scaler))
    grad_norm = optimizer_update(optimizer, lr_scheduler, grad_scaler, cfg.optim.max_grad_norm,
                                 lambda max_norm: par.clip_grad_norm(params, max_norm))
    return par.mean_over_ranks(sum(losses) / len(losses)), grad_norm, work


def optimizer_update(optimizer: Any, lr_scheduler: Any, grad_scaler: Any, max_grad_norm: float,
                     clip: Callable[[float], float]) -> float:
    """After backward: unscale (fp16), clip, step, advance the schedule, zero the gradients.

    clip(max_norm) clips and returns the pre-clip global norm; max_grad_norm <= 0 means no
    clipping (the norm is still measured and returned).
    """
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
    grad_norm = clip(max_grad_norm if max_grad_norm > 0 else float("inf"))
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """batches_per_epoch: global batches (the same count on every rank)."""
    if cfg.train.train_steps is not None:
        return cfg.train.train_steps
    return max(1, math.ceil(cfg.train.train_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


def load_loop_components(cfg: Config, variant: VariantSpec, device: torch.device) -> Any:
    """What the loop needs besides the transformer: the scheduler always; the VAE for I2V (the
    image is encoded every step) and for validation; T5 only for validation."""
    parts = ["scheduler"]
    if variant.is_i2v or cfg.validation.every_steps:
        parts.append("vae")
    if cfg.validation.every_steps:
        parts += ["text_encoder", "tokenizer"]
    comps = load_components(cfg.model.path, cfg.model.dtype, parts=tuple(parts))
    if comps.vae is not None:
        set_vae_memory_options(comps.vae, cfg.data.vae_slicing, cfg.data.vae_tiling)
        comps.vae.to(device)
    return comps


def build_parallel_model(cfg: Config, strategy: str, world: World, device: torch.device, tokens_per_sample: int,
                         ) -> tuple[Parallel, list[torch.nn.Parameter]]:
    """The transformer, patched and wrapped for the strategy, and its trainable parameters.

    Seeded first, so the LoRA initialisation is the same on every rank and in every run
    (whatever the data preparation drew from the RNG before): FSDP shards each rank's copy,
    so they must agree.
    """
    seed_everything(cfg.train.seed)
    shards = world.world_size // cfg.parallel.replicate_degree if strategy == "fsdp" else 1
    transformer, _ = build_transformer(cfg, device, tokens_per_sample, shards=shards, verbose=world.is_main)
    par = parallelize(transformer, cfg.parallel, strategy, world, device, cfg.model.dtype)
    # fully_shard swapped every parameter for a DTensor shard: take them again.
    return par, [p for p in transformer.parameters() if p.requires_grad]


def step_metrics(state: TrainState, loss: float, grad_norm: float, lr: float, dt: float, work: StepWork,
                 world: World, peak: float | None, device: torch.device) -> dict[str, Any]:
    """One metrics.jsonl record. Throughput counts the global batch (every rank's slice has the
    same shape); tflops is the whole job's, mfu is per device."""
    n = world.world_size
    tflops = work.flops * n / dt / 1e12
    return {
        "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
        "samples_per_s": work.samples * n / dt, "tokens_per_s": work.video_tokens * n / dt,
        "tflops": tflops, "mfu": None if peak is None else tflops * 1e12 / (peak * n),
        "mem_peak_gb": peak_memory_gb(device),
    }


def train(cfg: Config) -> RunSummary:
    """Run a whole training job described by `cfg`; returns the end-of-run summary.

    Under torchrun every rank calls this; each returns the same summary.
    """
    t_start = time.perf_counter()
    world = init_distributed(cfg.parallel.timeout_s)
    strategy = resolve_strategy(cfg.parallel, world)
    check_optimizer(cfg.optim, strategy)
    check_optimizer_available(cfg)
    device = device_for(world)
    check_fast_path(cfg, device)
    variant, samples = check_inputs(cfg, world)
    out, resume_path = prepare_output_dir(cfg, world)
    seed_everything(cfg.train.seed)

    dataset = prepare_dataset(cfg, samples, variant, device, world)
    comps = load_loop_components(cfg, variant, device)
    bucket_of = [it.bucket for it in dataset.items]
    par, params = build_parallel_model(cfg, strategy, world, device, max_video_tokens(dataset, variant))
    transformer = par.module
    objective = make_objective(cfg, variant, comps.scheduler, comps.vae)
    if world.distributed:
        objective.set_shard(world.rank, world.world_size)
    sampler = BucketBatchSampler(bucket_of, cfg.train.batch_size, cfg.train.seed, rank=world.rank,
                                 world_size=world.world_size)
    steps = total_steps(cfg, len(sampler))
    optimizer, lr_scheduler = build_optimizer(cfg, params, steps)
    grad_scaler = grad_scaler_for(strategy, device, cfg.model.dtype)

    state = TrainState()
    if resume_path is not None:
        state = load_checkpoint(resume_path, transformer, optimizer, lr_scheduler, grad_scaler)
        if world.is_main:
            print(f"resumed from {resume_path} at step {state.step}")
    else:
        seed_everything(cfg.train.seed)  # the same draws whether or not earlier setup used the RNG
    metrics = (MetricsWriter(out, cfg.log.report_to, cfg.log.tracker_name, to_dict(cfg),
                             resume_step=state.step if resume_path else None) if world.is_main else None)
    checkpointer = Checkpointer(out, world, cfg.checkpoint.limit, cfg.checkpoint.async_save)

    count = WorkCounter(transformer.config, variant, cfg)
    peak = peak_flops(device)
    batches = micro_batches(dataset, cfg, state, device, world)
    losses: list[float] = []
    step_times: list[float] = []
    step_samples: list[int] = []
    bar = tqdm(total=steps, initial=state.step, desc="training", unit="step",
               disable=not (cfg.log.progress_bar and world.is_main), dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while state.step < steps:
        t0 = time.perf_counter()
        loss, grad_norm, work = train_step(objective, par, params, batches, optimizer, lr_scheduler, grad_scaler,
                                           cfg, count)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        state.step += 1
        losses.append(loss)
        step_times.append(dt)
        step_samples.append(work.samples * world.world_size)
        lr = float(lr_scheduler.get_last_lr()[0])  # torchao's low-bit optimizers keep lr as a tensor
        if metrics is not None:
            metrics.write(step_metrics(state, loss, grad_norm, lr, dt, work, world, peak, device))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{grad_norm:.3f}")
        checkpointer.poll()
        last = state.step == steps
        every = cfg.checkpoint.every_steps
        if (every and state.step % every == 0) or (last and cfg.checkpoint.save_final):
            checkpointer.save(state, transformer, optimizer, lr_scheduler, grad_scaler)
        if cfg.validation.every_steps and state.step % cfg.validation.every_steps == 0:
            run_validation(cfg, comps, par, out, state.step, metrics)
    bar.close()
    checkpointer.wait()
    if metrics is not None:
        metrics.close()

    export_path = export_weights(cfg, par, out, variant)
    first = 1 if len(step_times) > 1 else 0  # the first step includes one-off warm-up
    return RunSummary(
        output_dir=out, steps=state.step, wall_time_s=time.perf_counter() - t_start,
        samples_per_s=sum(step_samples[first:]) / sum(step_times[first:]) if step_times else None,
        mem_peak_gb=peak_memory_gb(device), host_peak_rss_gb=host_peak_rss_gb(),
        export_path=export_path, losses=losses, resumed_from=resume_path, world_size=world.world_size,
        strategy=strategy,
    )


def run_validation(cfg: Config, comps: Any, par: Parallel, out: Path, step: int, metrics: MetricsWriter | None,
                   ) -> None:
    """Render the validation prompts. Under FSDP every forward is collective, so every rank
    renders (the same videos: same weights, same seeds); only rank 0 writes them."""
    from fastcog.validation import render_validation

    module = par.module  # never the DDP wrapper: inference needs no gradient sync
    written = render_validation(cfg, comps, module, out, step, par.device, write=par.world.is_main)
    if metrics is not None:
        for path in written:
            metrics.log_video(f"validation/{path.stem}", path, step)


# --------------------------------------------------------------------------------------------
# Export: the diffusers-format result, written by rank 0
# --------------------------------------------------------------------------------------------


def export_weights(cfg: Config, par: Parallel, out: Path, variant: VariantSpec) -> Path:
    """LoRA: out/lora/pytorch_lora_weights.safetensors; SFT: out/transformer (a diffusers folder).

    Under FSDP the full trainable state is first gathered to rank 0 (on the CPU); under DDP and
    in one process rank 0 already holds it.
    """
    sft = cfg.model.training_type == "sft"
    path = out / "transformer" if sft else out / "lora" / LORA_WEIGHTS_NAME
    full = gather_full_state(par.module, trainable_only=not sft) if par.strategy == "fsdp" else None
    if par.world.is_main:
        if sft:
            save_transformer(par.module, path, full)
        else:
            export_lora(par.module, cfg.lora, path.parent, variant.is_i2v, state_dict=full)
    barrier()
    return path


def gather_full_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors on rank 0's CPU, by parameter name; empty on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=options)


def save_transformer(transformer: torch.nn.Module, path: Path, full: dict[str, torch.Tensor] | None) -> None:
    """save_pretrained of the trained transformer; from `full` (gathered tensors) when given.

    The gathered tensors are put into a parameter-less copy built on the meta device, so the
    export needs no second full model in memory.
    """
    if full is None:
        transformer.save_pretrained(path)
        return
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        plain = CogVideoXTransformer3DModel.from_config(transformer.config)
    plain.load_state_dict(full, assign=True)
    plain.save_pretrained(path)


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
