"""torch.distributed as torchrun sets it up: nothing home-made beyond reading its env.

`init_distributed()` joins the process group when launched by torchrun (WORLD_SIZE > 1),
NCCL on GPUs and gloo on CPU, and is a no-op in a plain single process.

`parallelize()` wraps the (already patched) transformer for the configured strategy; it is
the last step of fastcog.build.parallelize_model:

  fsdp  FSDP2: `fully_shard` on each CogVideoX block, then on the root. With
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

from fastcog.config import OptimConfig, ParallelConfig
from fastcog.dtypes import torch_dtype
from fastcog.errors import ConfigError
from fastcog.optimizers import OPTIMIZER_SPECS


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


def check_optimizer(o: OptimConfig, strategy: str) -> None:
    """Refuse optimizer settings that cannot step FSDP's sharded parameters, before any work.

    Which optimizers and why: fastcog.optimizers (fsdp_refusal). Under DDP every rank holds whole
    tensors and steps as one process would.
    """
    if strategy != "fsdp":
        return
    refusal = OPTIMIZER_SPECS[o.name].fsdp_refusal
    if refusal:
        others = ", ".join(name for name, spec in OPTIMIZER_SPECS.items() if spec.fsdp_refusal is None)
        raise ConfigError(f"optim.name={o.name!r} cannot run under FSDP: {refusal}. Use parallel.strategy=ddp "
                          f"(each rank holds the whole model), or one of {others}")
    if o.cpu_offload:
        # torchao's CPUOffloadOptimizer is documented single-device.
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
    return None if dtype == "fp32" else torch_dtype(dtype)


def parallelize(transformer: torch.nn.Module, par: ParallelConfig, strategy: str, world: World,
                device: torch.device, param_dtype: torch.dtype | None) -> Parallel:
    """Wrap the transformer for `strategy` (from resolve_strategy). Call before building the optimizer:
    fully_shard replaces every parameter with a DTensor shard, which the optimizer must hold.
    param_dtype: FSDP's parameter cast (mixed_precision_dtype, or None: each tensor as stored)."""
    if strategy == "fsdp":
        apply_fsdp(transformer, par, world, device, param_dtype)
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
    gradients are reduced in fp32 into the fp32 shards the optimizer steps. FP8 weights are
    sharded like any other frozen Parameter (fastcog.build.shard_fp8_weights).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
