"""The training loop: train() -> train_step() -> forward_backward().

One process, or one per GPU under torchrun (fastcog.parallel: FSDP2, DDP). Every rank runs
the same loop on its slice of each global batch; rank 0 alone writes config, metrics, the
progress bar, checkpoint folder names and the exported weights. Everything the user can get
wrong (config, model folder, data files) is checked before the output directory is touched
(fastcog.inputs), so a bad run never damages an earlier one. The model is built by
fastcog.build, the result exported by fastcog.export.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastcog.banner import RunStart, banner
from fastcog.build import build_training_model, seed_everything
from fastcog.checkpoint import Checkpointer, TrainState, load_checkpoint
from fastcog.config import Config, to_dict
from fastcog.data.buckets import BucketBatchSampler
from fastcog.data.cache import CachedDataset
from fastcog.data.prepare import buckets_for
from fastcog.errors import FastcogError
from fastcog.export import export_weights
from fastcog.fast import check_fast_path
from fastcog.flops import StepWork, WorkCounter, peak_flops, step_metrics
from fastcog.inputs import (
    check_data,
    load_loop_components,
    max_video_tokens,
    prepare_datasets,
    prepare_output_dir,
    write_demo_data,
)
from fastcog.metrics import MetricsWriter, host_peak_rss_gb, peak_memory_gb
from fastcog.nonfinite import NonfiniteSteps
from fastcog.objective import Objective, make_objective
from fastcog.optim import apply_hyperparameters, build_optimizer, check_optimizer_available
from fastcog.parallel import (
    SINGLE_PROCESS,
    Parallel,
    World,
    check_optimizer,
    device_for,
    grad_scaler_for,
    init_distributed,
    resolve_strategy,
)
from fastcog.plan_report import check_run
from fastcog.plot import plot_at_end
from fastcog.progress import StepProgress, step_progress
from fastcog.stop import Preempted, StopRequest, ignore_stop_signals_in_worker
from fastcog.val_loss import ValidationLoss, describe


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
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient."""
    plot_path: Path | None = None
    """The curves of metrics.jsonl (fastcog.plot), written by rank 0 at the end of the run."""

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
            f"  loss           {trend}"
            + (f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else ""),
            f"  wall time      {self.wall_time_s:.1f} s",
            f"  throughput     {thr}",
            f"  peak device    {mem}",
            f"  peak host RSS  {self.host_peak_rss_gb:.2f} GB",
            f"  output         {self.output_dir}",
            f"  weights        {self.export_path}",
            *([f"  plot           {self.plot_path}"] if self.plot_path else []),
        ]


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
        worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
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
# The loop
# --------------------------------------------------------------------------------------------


def forward_backward(objective: Objective, transformer: torch.nn.Module, batch: dict, cfg: Config,
                     grad_scaler: Any) -> float:
    """One micro-batch. The objective owns the precision: only the transformer forward autocasts."""
    loss = objective(transformer, batch)
    scaled = loss / cfg.train.gradient_accumulation_steps
    (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
    return float(loss.detach())


@dataclass
class StepResult:
    loss: float
    """Averaged over micro-batches and ranks (the same on every rank)."""
    grad_norm: float
    """Pre-clip global gradient norm."""
    work: StepWork
    """This rank's work."""
    skipped: bool
    """Non-finite loss or gradient: the weights and optimizer state were left unchanged."""


def train_step(objective: Objective, par: Parallel, params: list, batches: Iterator, optimizer: Any,
               lr_scheduler: Any, grad_scaler: Any, cfg: Config, count: WorkCounter) -> StepResult:
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Gradients are reduced across ranks on the last micro-batch only. Every rank sees the same
    loss and norm, so all skip a non-finite step together.
    """
    losses, work = [], StepWork()
    accumulation = cfg.train.gradient_accumulation_steps
    for i in range(accumulation):
        batch = next(batches)
        count(batch, work)
        with par.grad_sync(is_last=i == accumulation - 1):
            losses.append(forward_backward(objective, par.forward_module, batch, cfg, grad_scaler))
    loss = par.mean_over_ranks(sum(losses) / len(losses))
    grad_norm, skipped = optimizer_update(optimizer, lr_scheduler, grad_scaler, cfg.optim.max_grad_norm,
                                          lambda max_norm: par.clip_grad_norm(params, max_norm), math.isfinite(loss))
    return StepResult(loss, grad_norm, work, skipped)


def optimizer_update(optimizer: Any, lr_scheduler: Any, grad_scaler: Any, max_grad_norm: float,
                     clip: Callable[[float], float], loss_finite: bool = True) -> tuple[float, bool]:
    """After backward: unscale (fp16), clip, step, advance the schedule, zero the gradients.

    clip(max_norm) clips and returns the pre-clip global norm; max_grad_norm <= 0 means no
    clipping (the norm is still measured and returned). Returns (norm, skipped): a non-finite
    loss or norm never reaches the weights. fp16's scaler skips steps with overflowing gradients
    itself (that is how it finds its scale), so there only a non-finite loss counts as skipped.
    """
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
    grad_norm = clip(max_grad_norm if max_grad_norm > 0 else float("inf"))
    if grad_scaler is not None:
        skipped = not loss_finite
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        skipped = not (loss_finite and math.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """batches_per_epoch: global batches (the same count on every rank)."""
    if cfg.train.train_steps is not None:
        return cfg.train.train_steps
    return max(1, math.ceil(cfg.train.train_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


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
    write_demo_data(cfg, world)
    variant, split = check_data(cfg)  # the held-out set (fastcog.data.heldout) is never trained on
    run_check = check_run(cfg, device, world.world_size, strategy)  # the strategy's choice waits for the banner
    strategy = run_check.strategy
    if world.is_main:
        print("\n".join(run_check.warnings), end="\n" if run_check.warnings else "")
    out, resume_path, record = prepare_output_dir(cfg, variant, world)
    seed_everything(cfg.train.seed)

    dataset, heldout = prepare_datasets(cfg, split, variant, device, world)
    comps = load_loop_components(cfg, variant, device)
    bucket_of = [it.bucket for it in dataset.items]
    model = build_training_model(cfg, device, tokens_per_sample=max_video_tokens(dataset, variant), world=world,
                                 strategy=strategy, verbose=False)  # its report goes into the banner
    par, params = model.par, model.params
    transformer = par.module
    objective = make_objective(cfg, variant, comps.scheduler, comps.vae)
    if world.distributed:
        objective.set_shard(world.rank, world.world_size)
    sampler = BucketBatchSampler(bucket_of, cfg.train.batch_size, cfg.train.seed, rank=world.rank,
                                 world_size=world.world_size)
    steps = total_steps(cfg, len(sampler))
    optimizer, lr_scheduler = build_optimizer(cfg, params, steps)
    grad_scaler = grad_scaler_for(strategy, device, cfg.model.dtype)
    val_loss = ValidationLoss.create(cfg, variant, comps, heldout, par)

    state = TrainState()
    if resume_path is not None:
        state = load_checkpoint(resume_path, transformer, optimizer, lr_scheduler, grad_scaler)
        apply_hyperparameters(optimizer, lr_scheduler, cfg.optim)  # accepted changes (lr, betas, ...) take effect
    else:
        seed_everything(cfg.train.seed)  # the same draws whether or not earlier setup used the RNG
    if world.is_main:
        print("\n".join(banner(RunStart(
            cfg, variant.name, sampler, buckets_for(cfg), steps=steps, start_step=state.step, resumed_from=resume_path,
            trainable=sum(p.numel() for p in params), world_size=world.world_size, strategy=strategy, device=device,
            build_lines=model.report.lines, strategy_choice=run_check.strategy_choice,
            validation=describe(split, heldout, val_loss)))))
    metrics = (MetricsWriter(out, cfg.log.report_to, cfg.log.tracker_name, to_dict(cfg),
                             resume_step=state.step if resume_path else None) if world.is_main else None)
    checkpointer = Checkpointer(out, world, cfg.checkpoint.limit, cfg.checkpoint.async_save, record)

    count = WorkCounter(transformer.config, variant, cfg)
    peak = peak_flops(device)
    batches = micro_batches(dataset, cfg, state, device, world)
    losses: list[float] = []
    step_times: list[float] = []
    step_samples: list[int] = []
    bar = step_progress(steps, state.step, enabled=cfg.log.progress_bar and world.is_main)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop, nonfinite = StopRequest(), NonfiniteSteps(cfg.train.max_nonfinite_steps)
    log = bar if world.is_main else None
    with stop.handling(), _closed_at_exit(bar, metrics):
        if val_loss is not None and state.step == 0:
            val_loss.log(0, metrics, log)  # the base model's, to compare the first evaluations with
        while state.step < steps:
            t0 = time.perf_counter()
            result = train_step(objective, par, params, batches, optimizer, lr_scheduler, grad_scaler, cfg, count)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            state.step += 1
            losses.append(result.loss)
            step_times.append(dt)
            step_samples.append(result.work.samples * world.world_size)
            lr = float(lr_scheduler.get_last_lr()[0])  # torchao's low-bit optimizers keep lr as a tensor
            if metrics is not None:
                row = step_metrics(state, result.loss, result.grad_norm, lr, dt, result.work, world, peak, device)
                metrics.write({**row, "skipped": result.skipped})
            nonfinite.record(state.step, result.loss, result.grad_norm, result.skipped,
                             log=log.write if log is not None else None)
            bar.step(result.loss, lr, result.grad_norm)
            checkpointer.poll()
            every = cfg.checkpoint.every_steps
            saved = bool(every and state.step % every == 0) or (state.step == steps and cfg.checkpoint.save_final)
            if saved:
                checkpointer.save(state, transformer, optimizer, lr_scheduler, grad_scaler)
            if cfg.validation.every_steps and state.step % cfg.validation.every_steps == 0:
                from fastcog.validation import run_validation  # PyAV and the pipelines only when used

                run_validation(cfg, comps, par, out, state.step, metrics)
            if val_loss is not None and val_loss.due(state.step, steps):
                val_loss.log(state.step, metrics, log)
            if state.step < steps and stop.agreed(device, world.distributed):
                if not saved:
                    checkpointer.save(state, transformer, optimizer, lr_scheduler, grad_scaler)
                checkpointer.wait()
                raise Preempted(stop.message(state.step, out, cfg.checkpoint.resume_from is not None))
        checkpointer.wait()

    export_path = export_weights(cfg, par, out, variant)
    plot_path = plot_at_end(out) if world.is_main and cfg.log.plot else None
    first = 1 if len(step_times) > 1 else 0  # the first step includes one-off warm-up
    return RunSummary(
        output_dir=out, steps=state.step, wall_time_s=time.perf_counter() - t_start,
        samples_per_s=sum(step_samples[first:]) / sum(step_times[first:]) if step_times else None,
        mem_peak_gb=peak_memory_gb(device), host_peak_rss_gb=host_peak_rss_gb(),
        export_path=export_path, losses=losses, resumed_from=resume_path, world_size=world.world_size,
        strategy=strategy, skipped_steps=nonfinite.total, plot_path=plot_path,
    )


@contextlib.contextmanager
def _closed_at_exit(bar: StepProgress, metrics: MetricsWriter | None) -> Iterator[None]:
    """The progress bar and the metrics files are closed (flushed) however the loop ends."""
    try:
        yield
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
