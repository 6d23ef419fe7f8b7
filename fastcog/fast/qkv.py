"""Fused QKV (``fast.fused_qkv``): an attention's q, k and v projections as one GEMM over the concatenated
frozen weights, and their three LoRA down-projections as one rank-3r GEMM.

An attention qualifies when its to_q, to_k and to_v are fusable peft LoRA linears (fastcog.fast.lora.fusable)
with the same base kind (plain nn.Linear, or Fp8Linear rowwise), the same rank and scale, the same input
width, frozen bases with a bias on all three or none, and the same implementation chosen for them by
fast.lora_kernel (fused or unfused; peft keeps the three layers). Otherwise the three layers run as before
and the build logs why, one line per reason.

Weights, built once (``fuse_qkv``), as non-persistent buffers of the attention module: ``qkv_weight`` [3N, K]
and ``qkv_bias`` [3N] (plain base), or ``qkv_weight_fp8`` [3N, K] with ``qkv_weight_inv_scale`` [1, 3N]
(the rowwise scales, concatenated: the same bits) and ``qkv_weight_t_fp8`` [K, 3N] with
``qkv_weight_t_inv_scale`` [1, K] (W.T's scales are per input feature, one per projection: the three
dequantised copies are requantised as one, per row, which can drop the lowest bits of the projections
whose row scale was larger). Each projection's own frozen tensors then become views of these, so the
memory is not doubled and the parameter names, the state_dict, the exported LoRA and peft's modules are
exactly as before. Tensorwise FP8 keeps the three layers (three scales; one shared would requantise the
output GEMM too).

The forward (``project``) follows the implementation chosen for the three layers:

    fused    the Triton kernel (lora_linear / lora_linear_fp8) on the concatenated base with
             A = cat(Aq, Ak, Av) [3r, K] and B = block_diag(Bq, Bk, Bv) [3N, 3r]: the off-diagonal zeros
             triple the FLOPs of the three rank-sized up-projection products (S @ B.T, dy @ B, dB)
    unfused  the base GEMM over [3N, K] (cuBLAS, or Fp8Linear's _scaled_mm), S = x @ A.T [M, 3r] once,
             then per projection ``addmm`` of its columns of the base output + its S slice @ its B:
             no extra FLOPs

Either way dx is one GEMM over all three outputs' gradient, dA of the three A's one GEMM, and the frozen
base gets no gradient. Under FSDP the build keeps the three layers: fully_shard would replace the
projections' weights by shards and the concatenated buffers would stay whole on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcog.fast.fp8 import E4M3, Fp8Linear, _Fp8LinearFn, quantize
from fastcog.fast.lora import _compute_dtype, _output, base_kind, fusable, label
from fastcog.lora import ADAPTER_NAME

PROJECTIONS = ("to_q", "to_k", "to_v")
FLAG = "_fastcog_qkv"
"""The attention attribute naming the fused implementation (``fused`` / ``unfused``) once fuse_qkv ran."""


def why_not(attn: nn.Module) -> str | None:
    """None if this attention's q/k/v can run fused, else why not (a few words)."""
    layers = [getattr(attn, name, None) for name in PROJECTIONS]
    if not all(layer is not None and fusable(layer) for layer in layers):
        return "q/k/v are not all fusable LoRA linears"
    kinds = {base_kind(layer) for layer in layers}
    if len(kinds) != 1:
        return "q/k/v bases differ"
    if kinds == {"fp8-tensorwise"}:
        return "tensorwise FP8 bases (one scale per projection)"
    if len({label(layer) for layer in layers}) != 1:
        return "q/k/v run different LoRA implementations"
    if label(layers[0]) == "peft":
        return "q/k/v run peft's forward (fast.lora_kernel)"
    if len({(layer.lora_A[ADAPTER_NAME].weight.shape, layer.scaling[ADAPTER_NAME]) for layer in layers}) != 1:
        return "q/k/v LoRA ranks, widths or scales differ"
    bases = [layer.base_layer for layer in layers]
    if len({b.bias is None for b in bases}) != 1:
        return "some q/k/v biases are missing"
    frozen = [t for b in bases for t in (getattr(b, "weight", None), b.bias) if t is not None]
    if any(t.requires_grad for t in frozen):
        return "a q/k/v base weight or bias trains"
    return None


def _concatenate(attn: nn.Module, bases: list[nn.Module], name: str, dim: int, buffer: str) -> None:
    """cat the bases' `name` tensors along `dim` into a buffer of attn; each base's tensor becomes its slice."""
    tensors = [getattr(b, name) for b in bases]
    whole = torch.cat([t.detach() for t in tensors], dim=dim)
    attn.register_buffer(buffer, whole, persistent=False)
    offset = 0
    for base, t in zip(bases, tensors, strict=True):
        part = whole.narrow(dim, offset, t.shape[dim])
        offset += t.shape[dim]
        if isinstance(t, nn.Parameter):
            t.data = part  # the same Parameter object: its name and requires_grad unchanged
        else:
            setattr(base, name, part)


def fuse_attention(attn: nn.Module) -> None:
    """Build the concatenated weights of one qualifying attention (why_not is None) and switch it to them."""
    layers = [getattr(attn, name) for name in PROJECTIONS]
    bases = [layer.base_layer for layer in layers]
    with torch.no_grad():
        if bases[0].bias is not None:
            _concatenate(attn, bases, "bias", 0, "qkv_bias")
        else:
            attn.qkv_bias = None
        if isinstance(bases[0], Fp8Linear):
            _concatenate(attn, bases, "weight_fp8", 0, "qkv_weight_fp8")
            _concatenate(attn, bases, "weight_inv_scale", 1, "qkv_weight_inv_scale")
            # W.T's row scales differ per projection: dequantise, concatenate, requantise with shared scales.
            wide = torch.cat([b.weight_t_fp8.float() * b.weight_t_inv_scale.reshape(-1, 1) for b in bases], dim=1)
            wt, wt_inv = quantize(wide, E4M3, rowwise=True)
            attn.register_buffer("qkv_weight_t_fp8", wt, persistent=False)
            attn.register_buffer("qkv_weight_t_inv_scale", wt_inv.reshape(1, -1), persistent=False)
            offset = 0
            for base in bases:  # views with the shared scales: the same values as the fused copy, no new memory
                base.weight_t_fp8 = wt.narrow(1, offset, base.out_features)
                base.weight_t_inv_scale = attn.qkv_weight_t_inv_scale
                offset += base.out_features
        else:
            _concatenate(attn, bases, "weight", 0, "qkv_weight")
    setattr(attn, FLAG, label(layers[0]).removesuffix("-fp8"))


def fuse_qkv(transformer: nn.Module) -> tuple[int, dict[str, int]]:
    """Fuse every qualifying CogVideoX block attention; returns (fused count, {reason: count} of the others)."""
    fused, skipped = 0, {}
    for block in transformer.transformer_blocks:
        reason = why_not(block.attn1)
        if reason is None:
            fuse_attention(block.attn1)
            fused += 1
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    return fused, skipped


def _base_gemm(attn: nn.Module, base: nn.Module, x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x2d @ W_cat.T + b_cat as the base layers compute it (cuBLAS, or Fp8Linear's rowwise _scaled_mm)."""
    bias = attn.qkv_bias.to(dtype) if attn.qkv_bias is not None else None
    if isinstance(base, Fp8Linear):
        y = _Fp8LinearFn.apply(x2d, attn.qkv_weight_fp8, attn.qkv_weight_inv_scale, attn.qkv_weight_t_fp8,
                               attn.qkv_weight_t_inv_scale, True)
        return y + bias if bias is not None else y
    return F.linear(x2d, attn.qkv_weight.to(dtype), bias)


def project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """to_q(x), to_k(x), to_v(x) of an attention that fuse_attention switched, through one base GEMM."""
    layers = [getattr(attn, name) for name in PROJECTIONS]
    base = layers[0].base_layer
    dtype = _compute_dtype(base, x)
    x2d = x.to(dtype).reshape(-1, x.shape[-1])
    widths = [layer.lora_B[ADAPTER_NAME].weight.shape[0] for layer in layers]
    scale = layers[0].scaling[ADAPTER_NAME]
    lora_a = torch.cat([layer.lora_A[ADAPTER_NAME].weight for layer in layers]).to(dtype)  # [3r, K]
    lora_bs = [layer.lora_B[ADAPTER_NAME].weight.to(dtype) for layer in layers]
    if getattr(attn, FLAG) == "fused":
        lora_b = torch.block_diag(*lora_bs)  # [3N, 3r]: output column block i reads S block i only
        bias = attn.qkv_bias.to(dtype) if attn.qkv_bias is not None else None
        if isinstance(base, Fp8Linear):
            from fastcog.kernels import lora_linear_fp8

            y = lora_linear_fp8(x2d, attn.qkv_weight_fp8, attn.qkv_weight_inv_scale, attn.qkv_weight_t_fp8,
                                attn.qkv_weight_t_inv_scale, bias, lora_a, lora_b, scale, "rowwise")
        else:
            from fastcog.kernels import lora_linear

            y = lora_linear(x2d, attn.qkv_weight.to(dtype), bias, lora_a, lora_b, scale)
        outs = y.split(widths, dim=-1)
    else:
        s = F.linear(x2d, lora_a)  # [M, 3r]: one GEMM for the three down-projections
        r = lora_a.shape[0] // 3
        # Out of place into fresh q, k, v: backward then concatenates their gradients once for the base's
        # dx (an in-place addmm_ into column views would copy the whole [M, 3N] gradient once per view).
        outs = [torch.addmm(part, s[:, i * r:(i + 1) * r], lora_b.t(), alpha=scale)
                for i, (part, lora_b) in enumerate(zip(_base_gemm(attn, base, x2d, dtype).split(widths, dim=-1),
                                                       lora_bs, strict=True))]
    q, k, v = (_output(o, base, x).reshape(*x.shape[:-1], o.shape[-1]) for o in outs)
    return q, k, v
