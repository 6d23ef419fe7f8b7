"""One path: its starting adapters, building its model, optimizer and objective, the training step
every path runs, and running it into a PathResult (the plan of paths is rows.py's)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .attention_probe import NO_WARMUP, attention_kernels, attention_profiler
from .models import quiet_to
from .planned import device_gpu, path_plan, step_time_estimate
from .rows import PathSpec, plan_paths

__all__ = ["PathResult", "PathSpec", "build_path", "plan_paths", "run_path"]  # plan_paths: for the tests

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config

    from .models import Bench

LORA_B_INIT_RATIO = 0.1
"""--lora-b-init random: B ~ N(0, s^2) with s = ratio / (scale * sqrt(r)). With A drawn as peft draws it
(kaiming uniform, std 1/sqrt(3 in)) and a base weight of the same init, the adapter output is then
about `ratio` times the base linear's output: large enough that a wrong LoRA scale moves the loss."""


# --------------------------------------------------------------------------------------------
# Building and running one path
# --------------------------------------------------------------------------------------------


@dataclass
class PathResult:
    spec: PathSpec
    status: str = "not run"
    error_trace: str | None = None
    build_s: float | None = None
    warmup_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    peak_allocated_gb: float | None = None
    peak_reserved_gb: float | None = None
    planned_peak_gb: float | None = None
    """fastcog.plan's estimate for this path on a GPU (fastcog paths; the reference path keeps fp32
    frozen weights, which the plan does not model)."""
    planned_step_time_s: float | None = None
    """The same plan's predicted step time on this GPU (every path: the FLOPs do not depend on how the
    frozen weights are stored); None on CPU or an unknown GPU, planned_step_time_note says why."""
    planned_step_time_note: str | None = None
    patch_report: dict[str, Any] = field(default_factory=dict)
    final_lora: dict[str, torch.Tensor] | None = None
    lora_divergence: dict[str, Any] | None = None
    """Final adapters against the reference's (see lora_divergence); set once both have run."""
    attention_kernels: list[str] | None = None
    """The attention ops (and CUDA kernels) the profiled warm-up step ran (attention_probe)."""
    attention_kernel: str | None = None
    reused_entry: dict[str, Any] | None = None
    """--reference-from: the earlier run's JSON entry for this path, reported as it was."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def make_transformer(bench: Bench, dtype: str) -> torch.nn.Module:
    """The same base weights for every path: one seeded initialisation on the device, in fp32, cast
    to the path's storage dtype (what loading an fp32 checkpoint with that torch_dtype gives)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from fastcog.models import TORCH_DTYPES

    if bench.checkpoint is not None:
        sub = {"subfolder": "transformer"} if (bench.checkpoint / "transformer").is_dir() else {}
        model = CogVideoXTransformer3DModel.from_pretrained(bench.checkpoint, torch_dtype=TORCH_DTYPES[dtype], **sub)
        return model.to(bench.device)
    torch.manual_seed(bench.seed)
    with torch.device(bench.device):  # initialise where it runs: a 5B init on the host takes minutes
        model = CogVideoXTransformer3DModel(**bench.transformer_config)
    return quiet_to(model, dtype=TORCH_DTYPES[dtype])


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def start_adapters(model: torch.nn.Module, rank: int, alpha: float, seed: int, b_init: str) -> dict[str, torch.Tensor]:
    """Every path's starting adapters, a function of (seed, names, shapes) alone: from a host generator, in
    name order, so any process on any device, and a model in any storage dtype, starts from the same
    values. A as peft draws it (kaiming uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))); B zero, or
    N(0, s^2) with --lora-b-init random (see LORA_B_INIT_RATIO)."""
    import torch

    std = LORA_B_INIT_RATIO / ((alpha / rank) * math.sqrt(rank))
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        if "lora_A" in name:
            bound = 1 / math.sqrt(p.shape[1])
            out[name] = torch.empty(p.shape).uniform_(-bound, bound, generator=g)
        elif "lora_B" in name:
            out[name] = torch.randn(p.shape, generator=g) * std if b_init == "random" else torch.zeros(p.shape)
        else:
            raise ValueError(f"{name}: a trainable tensor that is no LoRA adapter")
    return out


def build_path(spec: PathSpec, bench: Bench) -> tuple[Any, ...]:
    """(model, params, objective, optimizer, lr_scheduler, grad_scaler, patch report) for one path."""
    import torch

    from fastcog.lora import inject_lora, load_trainable_state_dict

    cfg = spec.cfg
    model = make_transformer(bench, spec.frozen_dtype)
    params = inject_lora(model, cfg.lora)
    if bench.init_lora is None:
        bench.init_lora = start_adapters(model, cfg.lora.rank, cfg.lora.alpha, bench.seed, bench.lora_b_init)
    load_trainable_state_dict(model, bench.init_lora)
    model.to(bench.device).train()
    if spec.role == "reference":
        objective, optimizer, lr_scheduler, report = build_reference(model, params, cfg, bench)
    else:
        objective, optimizer, lr_scheduler, report = build_fastcog(model, params, cfg, bench)
    scaler = torch.amp.GradScaler(bench.device.type) if cfg.model.dtype == "fp16" else None
    return model, params, objective, optimizer, lr_scheduler, scaler, report


def build_reference(model: Any, params: list, cfg: Config, bench: Bench) -> tuple[Any, Any, Any, dict]:
    """The reference trainer's setup, written out here so no fastcog fast-path code is involved."""
    import torch
    from diffusers.optimization import get_scheduler

    from fastcog.models import TORCH_DTYPES
    from fastcog.objective import Objective

    model.enable_gradient_checkpointing()
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, step_rules=o.lr_step_rules,
                                 num_warmup_steps=o.lr_warmup_steps, num_training_steps=bench.total_steps,
                                 num_cycles=o.lr_num_cycles, power=o.lr_power)
    # As accelerate runs the reference: the transformer forward under autocast, its output in fp32.
    objective = Objective(bench.variant, bench.scheduler, bench.vae, cfg.model.i2v_image_scale,
                          TORCH_DTYPES[cfg.model.dtype])
    processors = {type(p).__name__ for p in model.attn_processors.values()}
    report = {"attention_backend": f"diffusers {', '.join(sorted(processors))} (SDPA, torch's choice)",
              "activation_checkpointing": "full (diffusers enable_gradient_checkpointing, every block)",
              "frozen_weights": f"fp32 under {cfg.model.dtype} autocast", "optimizer": "torch.optim.AdamW",
              "objective": "fastcog.objective.Objective, reference ops"}
    return objective, optimizer, lr_scheduler, report


def build_fastcog(model: Any, params: list, cfg: Config, bench: Bench) -> tuple[Any, Any, Any, dict]:
    """fastcog's path, patched by the trainer's own fastcog.build.parallelize_model."""
    from fastcog.build import parallelize_model
    from fastcog.objective import make_objective
    from fastcog.optim import build_optimizer

    built = parallelize_model(model, cfg, bench.device, tokens_per_sample=bench.video_tokens, verbose=False)
    objective = make_objective(cfg, bench.variant, bench.scheduler, bench.vae)
    optimizer, lr_scheduler = build_optimizer(cfg, built.params, bench.total_steps)
    report = dataclasses.asdict(built.report)
    for key, value in list(report.items()):  # lists of module names: the count is what a reader needs
        if key != "lines" and isinstance(value, list):
            report[key] = len(value)
    report.update(objective=f"{type(objective).__name__}, {objective.ops.name} ops", optimizer=type(optimizer).__name__)
    return objective, optimizer, lr_scheduler, report


def train_step(model: Any, params: list, objective: Any, optimizer: Any, lr_scheduler: Any, scaler: Any,
               batch: dict, cfg: Config) -> tuple[float, float]:
    """The one step every path runs: forward (the objective autocasts the transformer forward only),
    backward, clip, optimizer, LR, zero_grad."""
    import torch

    from fastcog.trainer import optimizer_update

    loss = objective(model, batch)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    value = float(loss.detach())  # the trainer's step reads it before the update too (non-finite skip)
    grad_norm, _ = optimizer_update(optimizer, lr_scheduler, scaler, cfg.optim.max_grad_norm,
                                    lambda max_norm: float(torch.nn.utils.clip_grad_norm_(params, max_norm)),
                                    math.isfinite(value))
    return value, grad_norm


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_path(spec: PathSpec, bench: Bench, res: PathResult) -> None:
    import torch

    t0 = time.perf_counter()
    model, params, objective, optimizer, lr_scheduler, scaler, res.patch_report = build_path(spec, bench)
    res.build_s = time.perf_counter() - t0
    record_plan(spec, bench, res)
    for line in res.patch_report.get("lines", []):
        print(f"[{spec.name}] {line}", file=sys.stderr, flush=True)
    if bench.device.type == "cuda":  # the training peak, resident weights included; build transients not
        sync(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
    if bench.warmup == 0:
        res.attention_kernels, res.attention_kernel = [], NO_WARMUP
    for k in range(bench.warmup + spec.steps):
        batch = {name: t.to(bench.device) for name, t in bench.batches[k].items()}
        torch.manual_seed(bench.seed + k)  # the same timesteps and noise at step k in every path
        res.lrs.append(float(lr_scheduler.get_last_lr()[0]))
        probe = k == bench.warmup - 1  # the last warm-up step: compiled and autotuned, and not timed
        with attention_profiler(bench.device) if probe else contextlib.nullcontext() as prof:
            sync(bench.device)
            start = time.perf_counter()
            loss, grad_norm = train_step(model, params, objective, optimizer, lr_scheduler, scaler, batch, spec.cfg)
            sync(bench.device)
            elapsed = time.perf_counter() - start  # before the profiler stops and collects its trace
        (res.warmup_times if k < bench.warmup else res.step_times).append(elapsed)
        if probe:
            res.attention_kernels, res.attention_kernel = attention_kernels(prof)
        res.losses.append(loss)
        res.grad_norms.append(grad_norm)
    if bench.device.type == "cuda":
        res.peak_allocated_gb = torch.cuda.max_memory_allocated(bench.device) / 1e9
        res.peak_reserved_gb = torch.cuda.max_memory_reserved(bench.device) / 1e9
    res.final_lora = lora_state(model)
    res.status = "ok"


def record_plan(spec: PathSpec, bench: Bench, res: PathResult) -> None:
    """The path's plan, made once: its peak (fastcog paths) and its predicted step time beside the measured ones."""
    # The reference's report describes diffusers' checkpointing in words; its config says "full".
    policy = spec.cfg.train.activation_checkpointing if spec.role == "reference" else \
        res.patch_report["activation_checkpointing"]
    gpu = device_gpu(bench.device)
    plan = path_plan(spec.cfg, bench.transformer_config, policy, gpu)
    if spec.role != "reference":
        res.planned_peak_gb = plan.memory.peak(plan.policy) / 1e9
    res.planned_step_time_s, res.planned_step_time_note = step_time_estimate(plan, gpu)


def run_path(spec: PathSpec, bench: Bench) -> PathResult:
    """Run one path; an exception becomes the row's status, so one broken switch still leaves a table."""
    res = PathResult(spec)
    print(f"[{spec.name}] building and running {bench.warmup} warm-up + {spec.steps} steps", file=sys.stderr,
          flush=True)
    try:
        _run_path(spec, bench, res)
    except Exception as err:  # noqa: BLE001 - recorded in the results, the run goes on
        first = (str(err).strip().splitlines() or [""])[0]
        res.status = f"failed: {type(err).__name__}: {first}"[:400]
        res.error_trace = traceback.format_exc()[-4000:]
        print(f"[{spec.name}] {res.status}", file=sys.stderr, flush=True)
    release_memory(bench.device)
    return res


def release_memory(device: torch.device) -> None:
    """Free the previous path's model, optimizer state and compiled graphs before the next path."""
    import torch

    gc.collect()
    try:
        torch._dynamo.reset()  # compiled code holds references to the compiled modules
    except Exception:  # noqa: BLE001 - nothing was compiled, or dynamo is unavailable
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
