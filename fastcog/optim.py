"""Optimizers and LR schedules.

`build_optimizer(cfg, params, total_steps)` returns (optimizer, lr_scheduler); the schedule is
always diffusers' `get_scheduler`, as in the reference.

The optimizers themselves (optim.name -> class, pip package, optimizer-state bytes per trained
value, whether they run under FSDP) are listed once, in fastcog.optimizers. The low-bit ones
quantise only tensors above a size threshold (see there), so the tiny demo model at LoRA rank 16
(every tensor < 4096 values) gets no saving from them; at rank 128 it does. The optional
packages are imported only when chosen; a missing one is a ConfigError naming the pip package.

optim.cpu_offload wraps the chosen class in torchao's CPUOffloadOptimizer: one optimizer per
tensor of >= 4096 values, its state and step on the CPU; smaller tensors keep a device-side
optimizer. It needs a CUDA device (torchao uses CUDA streams and pinned memory).

torchao's low-bit optimizers keep each group's lr as a 0-dim tensor (a float would be baked into
their compiled step and recompile it at every LR change); the schedule fills it in place, and
`get_last_lr()` returns tensors for them: callers take float().

Under FSDP the torchao optimizers step each rank's shard, the size thresholds above applying to the
shard, and compile their step without the on-disk AOTAutograd cache (`_without_autograd_cache`).

Checkpoints: every optimizer's state_dict() survives torch.save / torch.load(weights_only=False) and
continues bit-identically, torchao's tensor-subclass states included (tests/test_optim.py).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

import torch

from fastcog.config import Config, OptimConfig
from fastcog.errors import ConfigError
from fastcog.optimizers import OPTIMIZER_SPECS

# torchao's low-bit AdamWs: their step is compiled (see _without_autograd_cache for FSDP).
TORCHAO_LOW_BIT = tuple(name for name, spec in OPTIMIZER_SPECS.items() if spec.module == "torchao.optim")

# Prodigy estimates the step size D itself and multiplies it by lr: lr outside this range is
# almost certainly an AdamW learning rate carried over (2e-5 would make every step ~50,000x too small).
PRODIGY_LR_RANGE = (0.1, 10.0)


def _import(module: str, pip_name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"{what} needs the {pip_name!r} package, which cannot be imported ({err}): "
            f"`pip install {pip_name}`, or choose another optim.name"
        ) from err


def optimizer_class(o: OptimConfig) -> type[torch.optim.Optimizer]:
    """The optimizer class for optim.name (importing its package now)."""
    if o.name not in OPTIMIZER_SPECS:
        raise ConfigError(f"optim.name={o.name!r} is not one of {list(OPTIMIZER_SPECS)}")
    spec = OPTIMIZER_SPECS[o.name]
    return getattr(_import(spec.module, spec.pip, f"optim.name={o.name!r}"), spec.cls)


def optimizer_kwargs(o: OptimConfig) -> dict[str, Any]:
    """Keyword arguments of the chosen class, from the config."""
    if o.name == "came":
        return {"lr": o.lr, "betas": (*o.betas, o.came_betas3), "eps": (o.came_eps1, o.came_eps2),
                "weight_decay": o.weight_decay}
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "prodigy":
        kwargs.update(decouple=True, d_coef=o.prodigy_d_coef, safeguard_warmup=o.prodigy_safeguard_warmup)
    if o.fused:  # validate() allows it where fastcog.optimizers says so; fused=True also runs on CPU (torch >= 2.4)
        kwargs["fused"] = True
    return kwargs


def warn_prodigy_lr(o: OptimConfig) -> None:
    low, high = PRODIGY_LR_RANGE
    if o.name == "prodigy" and not low <= o.lr <= high:
        warnings.warn(
            f"optim.name=prodigy with optim.lr={o.lr:g}: Prodigy finds the step size itself and lr scales it, "
            "so it expects lr about 1.0 (set optim.lr: 1.0; use optim.prodigy_d_coef to make steps smaller)",
            UserWarning, stacklevel=3,
        )


def check_optimizer_available(cfg: Config) -> None:
    """What build_optimizer would refuse, without parameters, so a run can fail before it writes anything:
    the chosen package imports, and optim.cpu_offload has CUDA (torchao's CPUOffloadOptimizer copies over
    CUDA streams into pinned memory and asserts a CUDA/XPU device)."""
    optimizer_class(cfg.optim)
    if cfg.optim.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("optim.cpu_offload needs a CUDA device (it moves the optimizer state from the GPU to "
                          "the CPU); this machine has none: set optim.cpu_offload: false")


def _check_offload_params(params: list[torch.nn.Parameter]) -> None:
    on_cpu = [p for p in params if p.device.type != "cuda"]
    if on_cpu:
        raise ConfigError(f"optim.cpu_offload: {len(on_cpu)} trainable tensors are not on the GPU; the offload "
                          "moves GPU-resident training state to the CPU: set optim.cpu_offload: false")


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int) -> tuple[Any, Any]:
    """(optimizer, diffusers LR schedule) for the trainable params."""
    from diffusers.optimization import get_scheduler
    from torch.distributed.tensor import DTensor

    o = cfg.optim
    check_optimizer_available(cfg)
    if o.cpu_offload:
        _check_offload_params(params)
    cls = optimizer_class(o)
    warn_prodigy_lr(o)
    if o.name in TORCHAO_LOW_BIT and any(isinstance(p, DTensor) for p in params):
        cls = _without_autograd_cache(cls)
    if o.cpu_offload:
        optimizer = _offloaded(cls, params, optimizer_kwargs(o))
    else:
        optimizer = cls(params, **optimizer_kwargs(o))
    # Every class here is a torch.optim.Optimizer (CPUOffloadOptimizer subclasses it and exposes the inner
    # optimizers' param_groups dicts), so the schedule writes the lr of every inner optimizer. torchao's
    # low-bit optimizers keep lr as a tensor; torch's LRScheduler fills it in place (torch >= 2.2).
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, step_rules=o.lr_step_rules, num_warmup_steps=o.lr_warmup_steps,
        num_training_steps=total_steps, num_cycles=o.lr_num_cycles, power=o.lr_power,
    )
    return optimizer, lr_scheduler


def apply_hyperparameters(optimizer: Any, lr_scheduler: Any, o: OptimConfig) -> None:
    """After loading a checkpoint: the config's hyperparameters replace the saved ones.

    torch restores each param group's lr, betas, ... and the schedule's base lrs from the
    checkpoint, so a changed optim.lr would otherwise be ignored. With unchanged values this
    writes the same numbers back (the schedule's lr is recomputed by the same rule).
    """
    kwargs = optimizer_kwargs(o)
    lr = kwargs.pop("lr")
    kwargs.pop("fused", None)
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)  # every diffusers schedule is a LambdaLR
    for i, group in enumerate(optimizer.param_groups):
        for key, value in kwargs.items():
            if key in group:
                group[key] = value
        group["initial_lr"] = lr
        if lambdas is not None:
            _set_number(group, "lr", lr * lambdas[i](lr_scheduler.last_epoch))
    if lambdas is not None:
        lr_scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        lr_scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


def _set_number(group: dict[str, Any], key: str, value: float) -> None:
    if isinstance(group[key], torch.Tensor):  # torchao's low-bit optimizers keep lr as a tensor
        group[key].fill_(value)
    else:
        group[key] = value


def _without_autograd_cache(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` (a torchao low-bit AdamW) whose step compiles without torch's on-disk AOTAutogradCache.

    torchao compiles its per-tensor step. Under FSDP2 each state is a DTensor around a quantised
    tensor subclass, and the cache key torch 2.13 derives for a DTensor input is its spec alone (mesh,
    placements, global shape, stride, dtype: DTensor._stable_hash_for_caching), not what the local
    tensor is. The states of AdamW8bit, AdamW4bit and AdamWFp8 for the same parameters have equal
    specs, so a process loads from the cache (TORCHINDUCTOR_CACHE_DIR, by default
    /tmp/torchinductor_<user>, shared by every run on the machine) the step an earlier run compiled
    for another class. Measured on 2 CPU ranks (tests/test_distributed.py::
    test_torchao_low_bit_optimizers_under_fsdp_equal_one_process): adamw4bit after adamw8bit, and
    adamw_fp8 after either, crash in the cached step; adamw8bit after adamw_fp8 runs it on its 8-bit
    codes without an error and trains wrongly (exported LoRA B 2.7e-2 off one process in mean
    |difference| / mean |B|, where the right step is <= 4.5e-5 off and a 1% larger lr 1.0e-2).
    Without the AOTAutograd cache each new process traces the step again for each tensor shape (the
    inductor output is still cached, under a key from the traced graph, which has the inner tensors):
    with the tiny test model's 2 shapes a 2-rank CPU run took 12 s instead of 8.6 s (warm caches).
    Plain states (one process, DDP) are keyed by their inner tensors, which differ between the
    classes: they keep the cache.
    """
    import torch._functorch.config as functorch_config

    class WithoutAutogradCache(cls):  # type: ignore[misc, valid-type]
        def step(self, closure: Any = None) -> Any:
            with functorch_config.patch(enable_autograd_cache=False):
                return super().step(closure)

    WithoutAutogradCache.__name__ = WithoutAutogradCache.__qualname__ = cls.__name__
    return WithoutAutogradCache


def _offloaded(cls: type[torch.optim.Optimizer], params: list[torch.nn.Parameter],
               kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """torchao's CPUOffloadOptimizer, made to step on the clipped gradients.

    torchao copies each gradient to the host inside backward (a post-accumulate hook), i.e. before the
    trainer clips the gradients in place; the host step would then use the unclipped values. The
    subclass copies the (clipped) device gradients again right before the host steps: one extra
    device-to-host copy of the gradients per step (5B LoRA r128: 0.53 GB, an estimated ~20 ms at
    25 GB/s; not measured, no GPU here). Device gradients are kept (offload_gradients=False) because the
    trainer clips and logs their norm, and gradient accumulation needs them.

    Checkpointing: its state_dict() is {"offloaded": [one state dict per offloaded tensor], "on-device":
    ...}. It never calls Optimizer.__init__ (torchao 0.18 source), so it has no `.state`, and
    torch.distributed.checkpoint.state_dict.get_optimizer_state_dict cannot read it: save state_dict().
    """
    offload = _import("torchao.optim", "torchao", "optim.cpu_offload")

    class ClippedCPUOffloadOptimizer(offload.CPUOffloadOptimizer):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            device_mod = getattr(torch, self.device)
            self.stream.wait_stream(device_mod.current_stream())  # the clip has finished
            with device_mod.stream(self.stream):
                for p_device in list(self.queue):
                    if p_device.grad is not None:
                        self.param_d2h_map[p_device].grad.copy_(p_device.grad, non_blocking=True)
                    self.queue[p_device] = self.stream.record_event()
            return super().step(closure)

    return ClippedCPUOffloadOptimizer(params, cls, offload_gradients=False, **kwargs)


def _leaf_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data: a DTensor its local shard; a traceable tensor subclass
    (torchao's quantised optimizer states: codes, scales, quantisation map) its inner tensors (its own
    nbytes is the fp32 size)."""
    if hasattr(t, "to_local"):
        return _leaf_tensors(t.to_local())
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaf_tensors(getattr(t, name))]


def held_bytes(value: Any, skip_keys: tuple[str, ...] = ()) -> int:
    """Bytes of memory held by the tensors in a nest of dicts, lists and tuples (keys in `skip_keys`
    left out). A storage shared by several tensors is counted once; a DTensor counts its local shard
    and a quantised tensor subclass its inner tensors (see _leaf_tensors)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            for leaf in _leaf_tensors(value):
                storage = leaf.untyped_storage()
                key = (str(leaf.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in skip_keys:
                    walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(value)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of memory held by the optimizer's per-parameter state (not the parameters or gradients).

    Walks state_dict() (which references the live state tensors), skipping param_groups; a tensor
    shared between parameters (bitsandbytes' quantisation maps) is counted once. Under FSDP2 the state
    tensors are DTensors, whose inner tensor is this rank's shard: the result is per rank.
    """
    return held_bytes(optimizer.state_dict(), skip_keys=("param_groups",))
