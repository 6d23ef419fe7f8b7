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
* `offload`: `full`, with the block's saved inputs copied to host memory (pinned on a GPU host)
  as the forward goes and brought back when the block is recomputed, so the device holds no
  activations between blocks: one block's inputs and its full set while it is recomputed. The
  copies are asynchronous, on the compute stream; each block's [B, S, D] bf16 inputs are a few
  ms over PCIe against a block step of tens of ms at 49x480x720 (estimated from the FLOPs, not
  measured).
* `auto`: the fastest policy (none, selective, full, then offload) whose estimated peak fits in
  the device's memory minus `fast.memory_margin_gb` and what else is allocated there; the
  peak is fastcog.plan's (weights, gradients, optimizer state and these activations), the
  same estimate `fastcog plan` prints.

The wrapper replaces each block's `forward` (an instance attribute bound to one shared
function), so parameter names are unchanged and torch.compile sees the same code for every
block (one compiled graph reused by all blocks rather than a recompile per block).
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fastcog.fast.attention import ATTENTION_OPS
from fastcog.fast.autocast import training_autocast

POLICIES = ("none", "selective", "full", "offload")  # fastest first


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _keep_attention)


def host_copy(t: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
    """Pack hook of `offload`: a copy of `t` in host memory (a copy even on a CPU device, so the
    original is released either way), and where it came from."""
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=t.is_cuda)
    return t.device, host


def device_copy(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    """Unpack hook of `offload`: the saved tensor back on its device."""
    device, host = packed
    return host.to(device, non_blocking=True)


def _checkpointed_forward(self, *args, **kwargs):
    forward = self._fastcog_block_forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    if self._fastcog_checkpoint == "selective":
        return checkpoint(forward, self, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT, **kwargs)
    if self._fastcog_checkpoint == "offload":
        # The non-reentrant checkpoint saves its positional tensor inputs with save_for_backward,
        # outside its own discarding hooks, so these hooks see exactly them; keyword arguments it
        # keeps as they are, so the block's arguments (diffusers passes keywords) go positionally.
        # Everything the block saves inside is dropped and recomputed as under `full`. The RoPE
        # tables travel in a tuple, which is kept as it is: shared by all blocks, they stay put.
        bound = self._fastcog_signature.bind(self, *args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: host_copy(t), lambda p: device_copy(p)):
            return checkpoint(forward, *bound.args, use_reentrant=False, **bound.kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(transformer: torch.nn.Module, policy: str) -> None:
    """Wrap every block's forward with `policy` (full, selective or offload); none leaves them alone."""
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}")
    if policy == "none":
        return
    for block in transformer.transformer_blocks:
        block._fastcog_checkpoint = policy
        # The class's forward as a plain function attribute: dynamo cannot trace `type(self).forward`.
        block._fastcog_block_forward = type(block).forward
        block._fastcog_signature = inspect.signature(type(block).forward)
        block.forward = types.MethodType(_checkpointed_forward, block)


def compile_blocks(transformer: torch.nn.Module, fullgraph: bool) -> None:
    """torch.compile each block (fast.compile). Under `offload` only the block's own forward is
    compiled, once for all blocks, and the checkpoint wrapper stays eager around it: dynamo cannot
    trace saved-tensor hooks (with fullgraph it fails, without it the block splits in pieces)."""
    blocks = transformer.transformer_blocks
    if blocks and getattr(blocks[0], "_fastcog_checkpoint", None) == "offload":
        compiled = torch.compile(blocks[0]._fastcog_block_forward, fullgraph=fullgraph)
        for block in blocks:
            block._fastcog_block_forward = compiled
        return
    for block in blocks:
        block.compile(fullgraph=fullgraph)


def is_compiled(block: torch.nn.Module) -> bool:
    return (getattr(block, "_compiled_call_impl", None) is not None
            or hasattr(getattr(block, "_fastcog_block_forward", None), "_torchdynamo_orig_callable"))


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
    saved_inputs: int = 0
    """The tensor inputs a checkpointed block saves (its two streams and temb; the RoPE tables are
    shared by all blocks): what `offload` keeps in host memory per block."""
    backward: int = 0
    """What differentiating one block holds beyond what it saved: the gradients of its outputs and
    its backward's buffers at their largest (the FF gradients [B, S, 4D], attention's dq/dk/dv).
    The first block differentiated holds them while every other block's activations are still
    saved, and a checkpointed block after its recompute, so every policy's peak has them once.
    Without them the plan fell 11% (none) and 17% (full) short of a measured CPU step
    (tests/test_plan_measured.py). At 5B, 17550 tokens, batch 1, bf16: about 1 GB, next to
    6.8 GB of `full` activations; the eager block's figure (a compiled block may fuse some away)."""

    def peak(self, policy: str) -> int:
        """Device bytes: saved activations of every block, plus one block's full set while it is
        recomputed (full / selective / offload; offload keeps only that block's inputs, brought
        back from the host), plus one block's backward working set."""
        if policy == "offload":
            return self.full + self.none + self.backward
        per_block = getattr(self, policy)
        return self.blocks * per_block + (self.none if policy != "none" else 0) + self.backward

    def host_bytes(self, policy: str) -> int:
        """Host memory the policy holds at the end of the forward (offload only)."""
        return self.blocks * self.saved_inputs if policy == "offload" else 0


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
                               device: torch.device, cuda_rules: bool = False) -> ActivationEstimate:
    """Run block 0's forward and backward on fake tensors at the real shape: count what autograd
    saves, and the most the backward holds at once beyond that (`ActivationEstimate.backward`).

    Fake tensors have shapes and dtypes but no storage, so this measures the real block
    (whatever kernels and attention backend are installed) at full size without computing
    or allocating anything. The forward runs under the training forward's autocast
    (fastcog.fast.autocast: the device's own, or CUDA's rules on the meta device when
    `cuda_rules`, for a GPU run planned on another machine). Every storage an op creates is
    tracked until it is freed, which a weak reference to the storage observes (torch keeps a
    storage's Python object as long as the storage lives, also when only autograd holds it).
    Only the inputs' gradients are asked for: weight gradients are the plan's gradient bytes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    block = transformer.transformer_blocks[0]
    saved: dict[int, int] = {}
    live: dict[int, tuple[int, weakref.ref]] = {}
    not_activations: set[int] = set()
    attention_bytes = held = most = 0

    def freed(key: int) -> None:
        nonlocal held
        held -= live.pop(key)[0]

    def track(t: torch.Tensor) -> None:
        nonlocal held, most
        storage = t.untyped_storage()
        key = storage._cdata
        if key in live or key in not_activations:
            return
        live[key] = (storage.nbytes(), weakref.ref(storage, lambda _ref, key=key: freed(key)))
        held += storage.nbytes()
        most = max(most, held)

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal attention_bytes
            out = func(*args, **(kwargs or {}))
            if func in ATTENTION_OPS:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                attention_bytes += sum(t.nbytes for t in outs[:2] if isinstance(t, torch.Tensor))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    track(t)
            return out

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        # Explicit fake parameters (and buffers) so that saved weights can be told apart from
        # activations: they are not activation memory.
        state = {name: mode.from_tensor(t) for name, t in
                 [*block.named_parameters(), *block.named_buffers()]}
        inputs = _block_inputs(transformer, batch, tokens, dtype, device)
        # RoPE tables are saved by every block but exist once: not per-block memory either.
        not_activations.update(t.untyped_storage()._cdata for t in [*state.values(),
                                                                    *inputs.get("image_rotary_emb", ())])

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in not_activations:
                saved[key] = t.untyped_storage().nbytes()
            return t

        # Both streams require grad, as in every block after the first (the LoRA or SFT
        # updates of earlier blocks reach them); temb does not in LoRA training.
        streams = [inputs["hidden_states"].requires_grad_(True),
                   inputs["encoder_hidden_states"].requires_grad_(True)]
        input_bytes = sum(t.nbytes for t in streams)
        saved_inputs = input_bytes + inputs["temb"].nbytes
        with Allocations():
            for t in (*streams, inputs["temb"]):
                track(t)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    training_autocast(device, dtype, cuda_rules):
                outputs = torch.func.functional_call(block, state, (), inputs)
            del inputs
            before = most = held
            torch.autograd.grad(outputs, streams, [torch.ones_like(o) for o in outputs])
    return ActivationEstimate(none=sum(saved.values()), full=input_bytes, selective=input_bytes + attention_bytes,
                              blocks=len(transformer.transformer_blocks), saved_inputs=saved_inputs,
                              backward=most - before)


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


def choose_policy(estimate: ActivationEstimate, budget_bytes: int, offload: bool = True) -> str:
    """The fastest policy whose peak fits; the one that needs the least when none does.
    offload=False leaves `offload` out: on a CPU device the host is the device, and it saves nothing."""
    candidates = POLICIES if offload else tuple(p for p in POLICIES if p != "offload")
    for policy in candidates:
        if estimate.peak(policy) <= budget_bytes:
            return policy
    return candidates[-1]
