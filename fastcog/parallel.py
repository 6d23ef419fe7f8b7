"""torch.distributed as torchrun sets it up: nothing home-made beyond reading its env.

`init_distributed()` joins the process group when launched by torchrun (WORLD_SIZE > 1),
NCCL on GPUs and gloo on CPU, and is a no-op in a plain single process.

`parallelize()` wraps the (already patched) transformer for the configured strategy:

  fsdp  FSDP2: `fully_shard` on each CogVideoX block, then on the root. It runs after the fast
        path (activation checkpointing, then per-block compile), the order FSDP2 needs: the
        checkpoint wrapper and the compiled block sit inside the sharded unit. The FP8 weights
        of fast.fp8 / fast.fp8_weight_storage are sharded too (`shard_fp8_weights`). With
        parallel.replicate_degree > 1 the mesh is 2D (replicate x shard): HSDP.
  ddp   DistributedDataParallel: every rank holds the whole model, gradients all-reduced.
  none  one process, the model as it is.

The returned `Parallel` is what the loop talks to: the module to call, gradient-sync control
for accumulation, the global gradient norm, and rank averages for logging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastcog.config import OPTIMIZERS, OptimConfig, ParallelConfig
from fastcog.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = World()


def init_distributed(timeout_s: float = 600.0) -> World:
    """Join torchrun's process group if there is one; return this process's place in it.

    timeout_s bounds every collective: a rank that stops answering (dead, stuck) makes the
    others fail after this long instead of waiting forever. When a worker process dies,
    torchrun itself stops the others at once and exits non-zero.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    """Leave the process group at the end of a successful run (torch warns otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE_PROCESS


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just [obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Strategy
# --------------------------------------------------------------------------------------------


def resolve_strategy(par: ParallelConfig, world: World) -> str:
    """`fsdp`, `ddp` or `none` for this run; checks what only the world size can tell.

    With one process there is nothing to shard or replicate, so every strategy runs as `none`
    (the same config then works with and without torchrun).
    """
    if not world.distributed:
        return "none"
    strategy = "fsdp" if par.strategy == "auto" else par.strategy
    if strategy == "none":
        raise ConfigError(
            f"parallel.strategy=none but torchrun started {world.world_size} processes: set parallel.strategy "
            "to auto, fsdp or ddp, or launch one process"
        )
    if par.replicate_degree > 1 and strategy != "fsdp":
        raise ConfigError(f"parallel.replicate_degree={par.replicate_degree} (HSDP) needs parallel.strategy=fsdp, "
                          f"not {strategy}: set replicate_degree to 1 or use fsdp")
    if world.world_size % par.replicate_degree:
        raise ConfigError(
            f"parallel.replicate_degree={par.replicate_degree} does not divide the {world.world_size} ranks: use a "
            "divisor (usually the number of nodes), or 1 for plain FSDP"
        )
    return strategy


# Optimizers that step plain tensors only: FSDP hands them DTensor shards (measured on CPU with
# torch 2.13: CAME mixes DTensor and Tensor in its factored moments, bitsandbytes' update kernel
# has no DTensor sharding rule). torchao's CPUOffloadOptimizer is documented single-device.
NOT_WITH_FSDP = {"came": "CAME", "adamw8bit_bnb": "bitsandbytes' AdamW8bit"}

# Prodigy steps the shards, but wrongly: its step size D is a ratio of two sums over every trained
# value, which prodigyopt 1.1.2 reads with .item(), and .item() of a DTensor is this rank's local
# part (torch 2.13 dispatches _local_scalar_dense without a reduction). Measured on 2 CPU ranks
# (tests/test_distributed.py::test_prodigy_refused_under_fsdp_and_equal_to_one_process_under_ddp):
# after 12 steps the ranks held D = 5.36e-6 and 6.07e-6 where one process had 5.69e-6, and the exported
# LoRA B differed from one process's by 0.7% to 4% (DDP: < 5e-6). prodigyopt's own all-reduce
# (fsdp_in_use=True) is no way out: it puts its buffer on .cuda() (no CPU/gloo) and raises
# UnboundLocalError on a step with lr 0 (the first warm-up step). Under DDP every rank holds whole
# tensors and computes the D of one process.
PRODIGY_UNDER_FSDP = (
    "optim.name='prodigy' cannot run under FSDP: Prodigy's step size D comes from sums over all trained values, "
    "but each rank would sum only its own shards (prodigyopt reads the sums with .item(), which on a sharded "
    "DTensor is the local part), so every rank would step with a different D. Use parallel.strategy=ddp "
    "(each rank holds the whole model, D is that of one process), or another optim.name"
)
REFUSED_UNDER_FSDP = {*NOT_WITH_FSDP, "prodigy"}


def check_optimizer(o: OptimConfig, strategy: str) -> None:
    """Refuse optimizer settings that cannot step FSDP's sharded parameters, before any work."""
    if strategy != "fsdp":
        return
    if o.name in NOT_WITH_FSDP:
        raise ConfigError(
            f"optim.name={o.name!r} ({NOT_WITH_FSDP[o.name]}) cannot step FSDP's sharded parameters: use "
            f"parallel.strategy=ddp, or one of {', '.join(n for n in OPTIMIZERS if n not in REFUSED_UNDER_FSDP)}"
        )
    if o.name == "prodigy":
        raise ConfigError(PRODIGY_UNDER_FSDP)
    if o.cpu_offload:
        raise ConfigError("optim.cpu_offload (torchao's CPUOffloadOptimizer) is single-device and cannot step "
                          "FSDP's sharded parameters: use parallel.strategy=ddp, or set optim.cpu_offload: false")


@dataclass
class Parallel:
    """The transformer as the loop uses it, whatever the strategy."""

    strategy: str
    world: World
    module: torch.nn.Module
    """The transformer itself (FSDP2 shards it in place): config, state dicts, export, validation."""
    forward_module: torch.nn.Module
    """What the objective calls: the DDP wrapper under ddp, the transformer otherwise."""
    device: torch.device

    @contextlib.contextmanager
    def grad_sync(self, is_last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce gradients only on the last one.

        Earlier micro-batches accumulate local (unsharded) gradients without communication;
        the last backward reduces the sum once.
        """
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(is_last)
            self.module.set_is_last_backward(is_last)
            yield
        elif self.strategy == "ddp" and not is_last:
            with self.forward_module.no_sync():
                yield
        else:
            yield

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip by the norm over *all* gradients of all ranks; return that norm (before clipping).

        Under FSDP the gradients are DTensor shards: clip_grad_norm_ then reduces the partial
        norms across the mesh and returns a DTensor, whose full value every rank agrees on.
        """
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def mean_over_ranks(self, value: float) -> float:
        """The average of a per-rank scalar (each rank's loss over its slice of the global batch)."""
        if not self.world.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world.world_size


def mixed_precision_dtype(dtype: str) -> torch.dtype | None:
    """FSDP's param_dtype for model.dtype: the compute dtype, or None (no casting) for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)


def parallelize(transformer: torch.nn.Module, par: ParallelConfig, strategy: str, world: World,
                device: torch.device, dtype: str) -> Parallel:
    """Wrap the transformer for `strategy` (from resolve_strategy). Call before building the optimizer:
    fully_shard replaces every parameter with a DTensor shard, which the optimizer must hold."""
    if strategy == "fsdp":
        apply_fsdp(transformer, par, world, device, mixed_precision_dtype(dtype))
        return Parallel(strategy, world, transformer, transformer, device)
    if strategy == "ddp":
        return Parallel(strategy, world, transformer, apply_ddp(transformer, device), device)
    return Parallel(strategy, world, transformer, transformer, device)


def apply_fsdp(transformer: torch.nn.Module, par: ParallelConfig, world: World, device: torch.device,
               param_dtype: torch.dtype | None) -> None:
    """fully_shard each block, then the root (patch embedding, time embedding, final norm, proj_out).

    Mixed original dtypes in one unit are fine: FSDP2 requires one dtype only among the
    *trainable* parameters of a unit (all fp32 here: the LoRA adapters, or the SFT master
    weights), and all-gathers a unit whose shards differ in dtype (frozen bf16 base + fp32 LoRA,
    if param_dtype were None) as bytes. With param_dtype set, every parameter is cast to it
    before the all-gather (the LoRA adapters compute in bf16, as autocast would make them), and
    gradients are reduced in fp32 into the fp32 shards the optimizer steps.

    FP8 linears (fastcog.fast.fp8) keep their FP8 weights in buffers, which FSDP2 would leave
    whole on every rank (9.5 GB per rank at 5B); `shard_fp8_weights` makes them frozen
    Parameters, sharded in their block's unit like any other frozen weight, and turns the
    parameter cast off (see there). Without FP8 linears nothing here changes.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if shard_fp8_weights(transformer):
        param_dtype = None
    if par.replicate_degree > 1:
        mesh = init_device_mesh(device.type, (par.replicate_degree, world.world_size // par.replicate_degree),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world.world_size,), mesh_dim_names=("shard",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # The root returns its output as a reshaped view; FSDP2 warns that an in-place op on it
    # would skip the backward all-gather. The objectives only read it out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    blocks = list(transformer.transformer_blocks)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by the backward: keeping them
        # saves one all-gather per step.
        reshard = par.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root's own parameters (embeddings, final norm and projection) are used last in the
    # forward and first in the backward: keep them gathered in between (FSDP2's root default).
    fully_shard(transformer, mesh=mesh, reshard_after_forward=False, mp_policy=mp)


def shard_fp8_weights(transformer: torch.nn.Module) -> bool:
    """Make the FP8 weights of the FP8 linears frozen Parameters, for fully_shard; False if none.

    Why Parameters: FSDP2 shards Parameters only. Frozen, they stay out of the optimizer and of
    checkpoints (saved with ignore_frozen_params; they are derived from the pretrained weights
    at conversion, as in one process) and get no gradient; FSDP2 shards them on dim 0,
    all-gathers them with the rest of their block before its forward and again before its
    backward (reshard_after_forward as set), and frees them after.

    Why no parameter cast (param_dtype None) for the whole model when there are FP8 weights: a
    MixedPrecisionPolicy casts *every* floating parameter of a unit to param_dtype before the
    all-gather, FP8 ones included, which would gather bf16 copies (twice the bytes) and hand the
    FP8 matmul bf16 weights. Without the cast the all-gather moves each tensor in its own dtype
    (a unit of mixed dtypes goes as one uint8 buffer): FP8 bytes for the FP8 weights, the frozen
    base as it is stored (bf16/fp16, the model dtype), and the fp32 LoRA adapters, which then
    meet the trainer's autocast inside the block exactly as in one process (gradients in fp32,
    reduced in fp32; tests/test_fp8_fsdp.py measures FSDP and DDP runs with the same per-rank
    batches giving identical losses). The price is the adapters gathered in fp32 rather than
    bf16: at 5B with rank 128 on four attention linears, 0.53 GB instead of 0.26 GB per pass,
    next to 9.5 GB of FP8 weights. Considered and not taken: a unit of their own per FP8
    linear with its own policy, whose FSDP hooks then sit inside the compiled block
    (fast.compile, fullgraph) and break its graph (FSDP2 wraps its hooks in
    torch._dynamo.disable; seen with torch 2.13); or resetting FSDP2's private per-parameter
    param_dtype after fully_shard.
    """
    from fastcog.fast.fp8 import fp8_modules

    modules = fp8_modules(transformer)
    for m in modules:
        m.weights_as_parameters()
    return bool(modules)


def apply_ddp(transformer: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # No buffer broadcast: the only buffers are positional tables computed identically on
    # every rank, and broadcasting them would add a collective to every forward.
    return torch.nn.parallel.DistributedDataParallel(
        transformer, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
    )


def grad_scaler_for(strategy: str, device: torch.device, dtype: str) -> Any:
    """The fp16 loss scaler (None otherwise). Under FSDP each rank sees only its gradient shard,
    so the inf/nan check must be agreed across ranks (ShardedGradScaler all-reduces it) or
    ranks would skip different steps."""
    if dtype != "fp16":
        return None
    if strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)
