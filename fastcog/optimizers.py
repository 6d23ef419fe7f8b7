"""Every optim.name and what fastcog knows about it, in one table.

The config's allowed optim.name values, fastcog.optim's class lookup and install hint,
fastcog.parallel's refusal under FSDP and fastcog.fast.checkpointing's memory estimate all
read `OPTIMIZER_SPECS`; nothing else lists optimizers.

state_bytes is the optimizer state per trained value for a tensor the optimizer quantises or
factors (bench/optimizer_state.py measures it; bench/results/optimizer_state_cpu_2026-11-24.md,
`4096x4096` column; tests/test_optim.py compares). Smaller tensors keep fp32 moments, 8 bytes a
value: torchao quantises a tensor of >= 4096 values that is a multiple of its block (256 for
8-bit and fp8, 128 for 4-bit), bitsandbytes one of >= 4096 values (min_8bit_size). CAME factors
matrices only; a vector gets a full second moment (8). Prodigy keeps a copy of the initial
weights beside its moments, one scalar for a tensor that starts at zero (LoRA B: 12).

This module imports nothing from fastcog, so every other module can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    """optim.name."""
    module: str
    """Module holding the class; imported only when this optimizer is chosen."""
    cls: str
    """Class name inside `module`."""
    pip: str
    """The package to `pip install` when `module` cannot be imported."""
    state_bytes: float
    """Optimizer-state bytes per trained value (see the module docstring)."""
    fused: bool = False
    """optim.fused (torch's single-kernel implementation) applies."""
    fsdp_refusal: str | None = None
    """Why it cannot step FSDP's sharded parameters; None: it can."""


_SPECS = (
    OptimizerSpec("adamw", "torch.optim", "AdamW", "torch", state_bytes=8.0, fused=True),
    OptimizerSpec("adam", "torch.optim", "Adam", "torch", state_bytes=8.0, fused=True),
    # 8-bit: 1 byte per moment value plus an fp32 scale per 256-value block.
    OptimizerSpec("adamw8bit_bnb", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", state_bytes=2 * (1 + 4 / 256),
                  fsdp_refusal="bitsandbytes' update kernel has no DTensor sharding rule (torch 2.13)"),
    OptimizerSpec("adamw8bit", "torchao.optim", "AdamW8bit", "torchao", state_bytes=2 * (1 + 4 / 256)),
    # 4-bit: half a byte per moment value plus an fp32 scale per 128 values.
    OptimizerSpec("adamw4bit", "torchao.optim", "AdamW4bit", "torchao", state_bytes=2 * (0.5 + 4 / 128)),
    OptimizerSpec("adamw_fp8", "torchao.optim", "AdamWFp8", "torchao", state_bytes=2 * (1 + 4 / 256)),
    # Measured on 2 CPU ranks (tests/test_distributed.py::
    # test_prodigy_refused_under_fsdp_and_equal_to_one_process_under_ddp): after 12 steps the ranks held
    # D = 5.36e-6 and 6.07e-6 where one process had 5.69e-6, and the exported LoRA B was 0.7% to 4% off
    # one process's (DDP: < 5e-6). prodigyopt's own all-reduce (fsdp_in_use=True) is no way out: it puts
    # its buffer on .cuda() (no CPU/gloo) and fails on a step with lr 0 (the first warm-up step).
    OptimizerSpec("prodigy", "prodigyopt", "Prodigy", "prodigyopt", state_bytes=16.0,
                  fsdp_refusal="Prodigy's step size D comes from sums over all trained values, but prodigyopt "
                  "reads them with .item(), which on a sharded DTensor is this rank's part, so every rank "
                  "would step with a different D"),
    # First moment in full, second moment and instability factored into rows and columns.
    OptimizerSpec("came", "came_pytorch", "CAME", "came-pytorch", state_bytes=4.0,
                  fsdp_refusal="CAME mixes DTensor shards and plain tensors in its factored moments (torch 2.13)"),
)

OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _SPECS}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZER_SPECS)
# The optim.name annotation; built from the table, so a new entry is at once a valid name.
OptimizerName = Literal[OPTIMIZER_NAMES]  # type: ignore[valid-type]
