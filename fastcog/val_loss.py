"""The validation loss: the training objective on the held-out set, at fixed timesteps and noise.

Why: each training step draws its timesteps and noise at random, and the loss depends on the
timestep as much as on the weights, so the training loss is too noisy to tell whether the model
still improves. Here every held-out sample (fastcog.data.heldout) is evaluated at the same
timesteps (validation.loss_quantiles of the schedule) with the same noise every time: between
two evaluations only the weights differ, and a falling `val_loss` means the model got better on
clips it never trained on.

How:
- The loss is fastcog.objective's, built as training builds it (make_objective: the same
  noising, loss and precision, the fused kernels when fast.fused_loss), with the timestep passed
  in instead of drawn. It is not sharded (Objective.set_shard): each sample is evaluated whole.
- The other draws (latent noise; I2V: the image-noise sigma, the image noise, the VAE sample)
  come from the global RNG seeded per (validation.seed, sample, timestep) inside
  torch.random.fork_rng, which puts the training RNG back afterwards: turning the validation
  loss on changes no training draw, and so no training loss.
- One sample per forward, so a sample's seed fixes its noise whatever the bucket, the batch or
  the number of ranks; in eval mode (no dropout) and under no_grad.
- Under torchrun sample i is evaluated by rank i % world_size. Each rank writes its samples'
  losses into an [samples, timesteps] table of zeros; one all-reduce (a sum) hands every rank the
  whole table, exactly (each entry is one rank's value plus zeros), and the means are taken in
  sample order, so they are one process's. Under FSDP every forward is collective (it gathers
  the weights from all ranks), so every rank runs the same number of forwards: a rank with
  fewer samples repeats one and drops its loss.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from fastcog.config import Config
from fastcog.data.cache import CachedDataset
from fastcog.data.heldout import DataSplit
from fastcog.metrics import MetricsWriter
from fastcog.objective import Objective, make_objective
from fastcog.parallel import Parallel
from fastcog.progress import StepProgress
from fastcog.variants import VariantSpec


def loss_timesteps(quantiles: tuple[float, ...], num_train_timesteps: int) -> list[int]:
    """The fixed timesteps: each quantile of the schedule (0.1 of 1000 -> 100), sorted, once each."""
    return sorted({min(num_train_timesteps - 1, round(q * num_train_timesteps)) for q in quantiles})


def noise_seed(seed: int, index: int, timestep: int) -> int:
    """The RNG seed of held-out sample `index` at `timestep`: a hash, so that neighbouring samples
    and timesteps get unrelated noise, and no seed depends on another's."""
    digest = hashlib.sha256(f"val-loss:{seed}:{index}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63: any torch generator accepts it


class ValidationLoss:
    """Evaluates and logs the validation loss of the model `par` trains (one per run)."""

    def __init__(self, cfg: Config, variant: VariantSpec, comps: Any, dataset: CachedDataset, par: Parallel) -> None:
        """comps: the loop's components (the scheduler; the VAE for I2V, which encodes its image)."""
        self.objective: Objective = make_objective(cfg, variant, comps.scheduler, comps.vae)
        self.timesteps = loss_timesteps(cfg.validation.loss_quantiles, self.objective.num_train_timesteps)
        self.every = cfg.validation.loss_every_steps
        self.seed = cfg.validation.seed
        self.dataset, self.par = dataset, par
        world = par.world
        self.mine: list[int | None] = list(range(world.rank, len(dataset), world.world_size))
        if par.strategy == "fsdp":  # collective forwards: the same count on every rank
            per_rank = math.ceil(len(dataset) / world.world_size)
            self.mine += [None] * (per_rank - len(self.mine))

    @classmethod
    def create(cls, cfg: Config, variant: VariantSpec, comps: Any, heldout: CachedDataset | None,
               par: Parallel) -> ValidationLoss | None:
        """The run's validation loss, or None when it is off (validation.loss_every_steps 0, no held-out set)."""
        if not cfg.validation.loss_every_steps or heldout is None:
            return None
        return cls(cfg, variant, comps, heldout, par)

    def due(self, step: int, last_step: int) -> bool:
        """Every loss_every_steps, and at the last step (the result the run ends with)."""
        return step % self.every == 0 or step == last_step

    @torch.no_grad()
    def evaluate(self, transformer: torch.nn.Module) -> dict[str, float]:
        """{"val_loss": the mean over samples and timesteps, "val_loss_t<t>": the mean over samples}.

        transformer: the module itself, never a DDP wrapper (no gradient sync to set up).
        """
        device = self.par.device
        table = torch.zeros(len(self.dataset), len(self.timesteps), dtype=torch.float64, device=device)
        was_training = transformer.training
        transformer.eval()
        try:
            for index in self.mine:
                item = self.dataset[0 if index is None else index]
                batch = {k: v.unsqueeze(0).to(device) for k, v in item.items()}
                for j, t in enumerate(self.timesteps):
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.manual_seed(noise_seed(self.seed, 0 if index is None else index, t))
                        loss = self.objective(transformer, batch, torch.full((1,), t, dtype=torch.long, device=device))
                    if index is not None:
                        table[index, j] = loss.double()
        finally:
            transformer.train(was_training)
        if self.par.world.distributed:
            dist.all_reduce(table)
        per_t = table.cpu().mean(dim=0)
        values = {"val_loss": float(per_t.mean())}
        values.update({f"val_loss_t{t}": float(v) for t, v in zip(self.timesteps, per_t.tolist(), strict=True)})
        return values

    def log(self, step: int, metrics: MetricsWriter | None, bar: StepProgress | None) -> dict[str, float]:
        """Evaluate (every rank), then write a metrics row of its own (rank 0: metrics is None
        elsewhere) and a progress line; returns the values."""
        t0 = time.perf_counter()
        values = self.evaluate(self.par.module)
        seconds = time.perf_counter() - t0
        if metrics is not None:
            metrics.write({"step": step, **values, "val_time_s": seconds}, group="validation")
        if bar is not None:
            bar.write(f"step {step}: val_loss {values['val_loss']:.6g} ({len(self.dataset)} held-out sample(s) x "
                      f"{len(self.timesteps)} timesteps, {seconds:.1f} s)")
        return values


def describe(split: DataSplit, heldout: CachedDataset | None, val: ValidationLoss | None) -> str | None:
    """The banner's `validation` row: how many samples are held out and what is done with them;
    None when the run holds none out."""
    if heldout is None:
        return None
    n = len(heldout)
    line = f"{n} held-out sample{'s' if n != 1 else ''} ({split.source}), never trained on; "
    if val is None:
        return line + "not evaluated (validation.loss_every_steps is 0)"
    return (line + f"val_loss every {val.every} steps, at the start and at the end, at t = "
            + ", ".join(map(str, val.timesteps)))
