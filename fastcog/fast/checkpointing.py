"""Activation checkpointing per CogVideoX block: none, full, selective, and auto.

What each policy keeps for backward, per block (B samples, S = L + N tokens, D width,
H heads; bytes in the compute dtype):

* `none`: everything autograd saves (measured, see `estimate_block_activations`); at 5B,
  49x480x720 this is tens of GB over 42 blocks, so it rarely fits with an optimizer.
* `full`: only the block's inputs (hidden states [B, N, D], text states [B, L, D]); the
  block is run again in backward. The reference trainer's gradient checkpointing.
* `selective`: the block's inputs plus the attention outputs [B, H, S, hd] and their
  log-sum-exp [B, H, S] (fp32): in backward the linears and pointwise ops are recomputed
  but attention, the most expensive op (about 60% of the FLOPs, docs/design.md), is not.
* `auto`: the fastest policy (none, then selective, then full) whose estimated peak fits in
  the device's memory minus `fast.memory_margin_gb` and what else is allocated there; the
  peak is fastcog.plan's (weights, gradients, optimizer state and these activations), the
  same estimate `fastcog plan` prints.

The wrapper replaces each block's `forward` (an instance attribute bound to one shared
function), so parameter names are unchanged and torch.compile sees the same code for every
block (one compiled graph reused by all blocks rather than a recompile per block).
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fastcog.fast.attention import ATTENTION_OPS

POLICIES = ("none", "selective", "full")  # fastest first


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _keep_attention)


def _checkpointed_forward(self, *args, **kwargs):
    forward = self._fastcog_block_forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    if self._fastcog_checkpoint == "selective":
        return checkpoint(forward, self, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(transformer: torch.nn.Module, policy: str) -> None:
    """Wrap every block's forward with `policy` (full or selective); none leaves them alone."""
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}")
    if policy == "none":
        return
    for block in transformer.transformer_blocks:
        block._fastcog_checkpoint = policy
        # The class's forward as a plain function attribute: dynamo cannot trace `type(self).forward`.
        block._fastcog_block_forward = type(block).forward
        block.forward = types.MethodType(_checkpointed_forward, block)


# --------------------------------------------------------------------------------------------
# auto: estimate, then choose
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes saved for backward by one block under each policy, and the block count."""

    none: int
    full: int
    selective: int
    blocks: int

    def peak(self, policy: str) -> int:
        """Saved activations of every block, plus one block's full set while it is recomputed
        and differentiated (for full / selective)."""
        per_block = getattr(self, policy)
        return self.blocks * per_block + (self.none if policy != "none" else 0)


def _block_inputs(transformer: torch.nn.Module, batch: int, tokens: int, dtype: torch.dtype,
                  device: torch.device) -> dict:
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    text = cfg.max_text_seq_length
    kwargs = {
        "hidden_states": torch.empty(batch, tokens, width, dtype=dtype, device=device),
        "encoder_hidden_states": torch.empty(batch, text, width, dtype=dtype, device=device),
        "temb": torch.empty(batch, cfg.time_embed_dim, dtype=dtype, device=device),
    }
    if cfg.use_rotary_positional_embeddings:
        kwargs["image_rotary_emb"] = tuple(
            torch.empty(tokens, cfg.attention_head_dim, dtype=torch.float32, device=device) for _ in range(2))
    return kwargs


def estimate_block_activations(transformer: torch.nn.Module, batch: int, tokens: int, dtype: torch.dtype,
                               device: torch.device) -> ActivationEstimate:
    """Run block 0's forward on fake tensors at the real shape and count what autograd saves.

    Fake tensors have shapes and dtypes but no storage, so this measures the real block
    (whatever kernels and attention backend are installed) at full size without computing
    or allocating anything.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    block = transformer.transformer_blocks[0]
    saved: dict[int, int] = {}
    attention_bytes = 0

    class AttentionOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal attention_bytes
            out = func(*args, **(kwargs or {}))
            if func in ATTENTION_OPS:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                attention_bytes += sum(t.nbytes for t in outs[:2] if isinstance(t, torch.Tensor))
            return out

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        # Explicit fake parameters (and buffers) so that saved weights can be told apart from
        # activations: they are not activation memory.
        state = {name: mode.from_tensor(t) for name, t in
                 [*block.named_parameters(), *block.named_buffers()]}
        inputs = _block_inputs(transformer, batch, tokens, dtype, device)
        # RoPE tables are saved by every block but exist once: not per-block memory either.
        shared = [*state.values(), *inputs.get("image_rotary_emb", ())]
        weights = {t.untyped_storage()._cdata for t in shared}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in weights:
                saved[key] = t.untyped_storage().nbytes()
            return t

        # Both streams require grad, as in every block after the first (the LoRA or SFT
        # updates of earlier blocks reach them); temb does not in LoRA training.
        inputs["hidden_states"].requires_grad_(True)
        inputs["encoder_hidden_states"].requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), AttentionOutputs():
            torch.func.functional_call(block, state, (), inputs)
    input_bytes = inputs["hidden_states"].nbytes + inputs["encoder_hidden_states"].nbytes
    none = sum(saved.values())
    return ActivationEstimate(none=none, full=input_bytes, selective=input_bytes + attention_bytes,
                              blocks=len(transformer.transformer_blocks))


def device_memory(device: torch.device) -> tuple[int, int, str]:
    """(total bytes, bytes in use now, a description) of the device's memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        where = torch.cuda.get_device_name(device)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        where = "host memory"
    return total, used, f"{where}: {total / 2**30:.1f} GiB total, {used / 2**30:.1f} GiB in use"


def choose_policy(estimate: ActivationEstimate, budget_bytes: int) -> str:
    """The fastest policy whose peak fits (full when none does: it needs the least)."""
    for policy in POLICIES:
        if estimate.peak(policy) <= budget_bytes:
            return policy
    return "full"
