"""Device memory a training run needs, per rank: one estimate for `fastcog plan` and for
`train.activation_checkpointing: auto`, so the two cannot disagree.

`memory_plan` reads a built transformer (the real one in the trainer; one on the meta device,
with no weights, in `fastcog plan`) as the trainer would train it, adapters and FP8 included:

* weights: every parameter and buffer as it is stored (frozen in the compute dtype, FP8 copies
  at 1 byte, trainable in fp32), divided over the FSDP shards;
* gradients: fp32, one per trainable value; optimizer state: fastcog.optimizers' bytes per
  value (none on the device with optim.cpu_offload);
* the RoPE tables (cos, sin: [tokens, head dim] fp32 each) that fastcog.objective computes once
  per latent shape and every block reads: the largest bucket's pair (9 MB at 5B, 17550 tokens;
  4% of what was live when tests/test_plan_measured.py's step began);
* activations saved for backward under each checkpointing policy, and one block backward's
  working set, from one block run forward and backward on fake tensors at the largest bucket's
  token count, under the training autocast (fastcog.fast.checkpointing, fastcog.fast.autocast).

A GPU runs attention with a fused kernel (flash or cuDNN) that saves its output and log-sum-exp,
never the score matrix; so does a CPU (SDPA's own flash kernel). On the meta device, torch's
SDPA decomposes into the math path, which saves the [S, S] scores; so when a GPU run is planned
on another machine (`for_gpu`), SDPA calls are routed to the flash-attention op, whose shape
rules (meta kernels) and saved tensors are the GPU's, and CUDA's autocast rules apply. The
trainer plans on its own device, as it will run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fastcog.config import Config, OptimConfig
from fastcog.fast import checkpointing as ac
from fastcog.optimizers import OPTIMIZER_SPECS


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device (one rank), by kind."""

    frozen_params: int
    """Frozen values, FP8 weights (buffers) and their scales included."""
    trainable_params: int
    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activations: ac.ActivationEstimate
    shards: int
    rope_bytes: int = 0
    """The RoPE tables of the largest bucket (see the module docstring); 0 for CogVideoX 2B."""

    @property
    def static_bytes(self) -> int:
        """Everything but activations: present for the whole step."""
        return (self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.rope_bytes)

    def peak(self, policy: str) -> int:
        """The step's estimated peak under `policy` (backward's transient block included)."""
        return self.static_bytes + self.activations.peak(policy)

    def choose_policy(self, capacity_bytes: int, offload: bool = True) -> str:
        """The fastest checkpointing policy whose peak fits in `capacity_bytes` (the one that needs
        the least when none does); offload=False when the device is the host."""
        return ac.choose_policy(self.activations, capacity_bytes - self.static_bytes, offload)


@contextmanager
def gpu_attention() -> Iterator[None]:
    """Route SDPA to the flash-attention op (see the module docstring)."""
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention

    class FlashAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa and kwargs.get("attn_mask") is None:
                q, k, v = args[:3]
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), False,
                    scale=kwargs.get("scale"))[0]
            return func(*args, **kwargs)

    with FlashAttention():
        yield


def memory_plan(transformer: torch.nn.Module, cfg: Config, tokens_per_sample: int, shards: int,
                device: torch.device, for_gpu: bool = False) -> MemoryPlan:
    """The per-rank plan of `transformer` as built for training (see the module docstring).
    device: where the fake block runs (the transformer's device; meta for a weightless one)."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    frozen = [t for t in [*transformer.parameters(), *transformer.buffers()] if not t.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    planned_elsewhere = for_gpu and device.type != "cuda"
    with gpu_attention() if planned_elsewhere else nullcontext():
        activations = ac.estimate_block_activations(transformer, cfg.train.batch_size, tokens_per_sample,
                                                    _compute_dtype(cfg), device, cuda_rules=planned_elsewhere)
    return MemoryPlan(
        frozen_params=sum(t.numel() for t in frozen),
        trainable_params=n_trainable,
        frozen_bytes=sum(t.numel() * t.element_size() for t in frozen) // shards,
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable) // shards,
        gradient_bytes=4 * n_trainable // shards,
        optimizer_bytes=optimizer_bytes(n_trainable, cfg.optim) // shards,
        activations=activations,
        shards=shards,
        rope_bytes=rope_table_bytes(transformer.config, tokens_per_sample),
    )


def rope_table_bytes(transformer_config: Any, tokens: int) -> int:
    """fastcog.objective.RotaryCache's tables for one latent shape: cos and sin, [tokens, head dim]
    fp32 each (diffusers' get_3d_rotary_pos_embed); none without RoPE."""
    if not transformer_config.use_rotary_positional_embeddings:
        return 0
    return 2 * tokens * transformer_config.attention_head_dim * 4


def optimizer_bytes(values: int, optim: OptimConfig) -> int:
    """Device bytes of the optimizer state for `values` trained values: fastcog.optimizers' bytes per
    value (measured, bench/optimizer_state.py); none with optim.cpu_offload (it lives on the host)."""
    return 0 if optim.cpu_offload else round(values * OPTIMIZER_SPECS[optim.name].state_bytes)


def _compute_dtype(cfg: Config) -> torch.dtype:
    from fastcog.models import TORCH_DTYPES

    return TORCH_DTYPES[cfg.model.dtype]
