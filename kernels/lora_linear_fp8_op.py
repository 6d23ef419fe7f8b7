"""Custom ops, autograd and the public ``lora_linear_fp8`` over the fused FP8-base LoRA kernels.

The math, fusion and kernels live in ``lora_linear_fp8`` (kernels -> ``quantize_lora`` /
``fp8_lora_mm`` launchers -> ``_lora_fp8_forward`` / ``_lora_fp8_backward``). This module wraps the
launch sequences as torch.library custom ops (``fastcog::lora_linear_fp8_fwd`` /
``fastcog::lora_linear_fp8_bwd``) with fake impls and a registered autograd formula, so
torch.compile(fullgraph=True) traces through without a graph break, and exposes ``lora_linear_fp8``,
which checks the arguments, flattens leading dims and casts the adapters and bias to x's dtype.
"""

from __future__ import annotations

import torch

# Importing .lora_linear_fp8 runs _common's package check first (kernels/__init__.py): under any
# name but fastcog.kernels this raises before the custom ops below are registered.
from .lora_linear_fp8 import E4M3, _lora_fp8_backward, _lora_fp8_forward

__all__ = ["lora_linear_fp8"]

RECIPES = ("tensorwise", "rowwise")


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op(
    "fastcog::lora_linear_fp8_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight_fp8, Tensor weight_inv_scale, Tensor weight_t_fp8, Tensor weight_t_inv_scale,"
    " Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, bool rowwise) -> (Tensor, Tensor)",
)
def lora_linear_fp8_fwd(x, weight_fp8, weight_inv_scale, weight_t_fp8, weight_t_inv_scale, bias, lora_a, lora_b,
                        scale, rowwise):  # fmt: skip
    # weight_t_* are inputs only so that autograd can save them for dx.
    return _lora_fp8_forward(x, weight_fp8, weight_inv_scale, bias, lora_a, lora_b, scale, rowwise)


@lora_linear_fp8_fwd.register_fake
def _(x, weight_fp8, weight_inv_scale, weight_t_fp8, weight_t_inv_scale, bias, lora_a, lora_b, scale, rowwise):
    return x.new_empty(x.shape[0], weight_fp8.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op(
    "fastcog::lora_linear_fp8_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight_t_fp8, Tensor weight_t_inv_scale, Tensor lora_a, Tensor lora_b,"
    " Tensor s, float scale, bool rowwise, bool need_x, bool need_bias, bool need_a, bool need_b)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
)
def lora_linear_fp8_bwd(dy, x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s, scale, rowwise,
                        need_x, need_bias, need_a, need_b):  # fmt: skip
    return _lora_fp8_backward(dy, x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s, scale, rowwise,
                              need_x, need_bias, need_a, need_b)  # fmt: skip


@lora_linear_fp8_bwd.register_fake
def _(dy, x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s, scale, rowwise, need_x, need_bias, need_a, need_b):
    def maybe(flag: bool, *shape: int) -> torch.Tensor:
        return dy.new_empty(shape) if flag else dy.new_empty(0)

    return (
        maybe(need_x, *x.shape),
        maybe(need_bias, dy.shape[1]),
        maybe(need_a, *lora_a.shape),
        maybe(need_b, *lora_b.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, _, _, weight_t_fp8, weight_t_inv_scale, bias, lora_a, lora_b, scale, rowwise = inputs
    _, s = output
    # The FP8 weight copy for dx and its scale are buffers (saved by reference, no new memory); x (for
    # dA) and S = s x A.T (rank wide, for dB) are the activations kept; y, x8 and x_inv are not.
    ctx.save_for_backward(x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s)
    ctx.scale = scale
    ctx.rowwise = rowwise
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(s)


def _backward(ctx, dy, _ds):
    x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_bias, need_a, need_b = need[0], bool(need[5] and ctx.has_bias), need[6], need[7]
    dx, db, da, dbb = lora_linear_fp8_bwd(
        dy, x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s, ctx.scale, ctx.rowwise,
        need_x, need_bias, need_a, need_b,
    )  # fmt: skip
    return (
        dx if need_x else None,
        None,  # the FP8 weights and their scales: frozen
        None,
        None,
        None,
        db if need_bias else None,
        da if need_a else None,
        dbb if need_b else None,
        None,
        None,
    )


lora_linear_fp8_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def lora_linear_fp8(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_inv_scale: torch.Tensor,
    weight_t_fp8: torch.Tensor,
    weight_t_inv_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    recipe: str,
) -> torch.Tensor:
    """``fp8_linear(x) + bias + scale * (x @ lora_a.T) @ lora_b.T`` with fused Triton kernels.

    The frozen base as ``fastcog.fast.fp8.Fp8Linear`` stores it: weight_fp8 [out, in] and weight_t_fp8
    [in, out] e4m3 with fp32 inverse scales ``[]`` (recipe "tensorwise") or ``[1, out]`` / ``[1, in]``
    ("rowwise"). x ``[..., in]`` bf16 or fp16 (the compute dtype: cast an fp32 x first); bias ``[out]``
    or None; lora_a ``[r, in]``; lora_b ``[out, r]``. Adapters and bias in another dtype (fp32 masters)
    are cast to x's dtype and their gradients flow back through the cast. x and dy are quantised as
    Fp8Linear does (e4m3; dy e5m2 under tensorwise); the LoRA term uses the unquantised x and dy.
    Differentiable in x, lora_a, lora_b and bias; the base never gets a gradient. Returns
    ``[..., out]`` in x's dtype.
    """
    if recipe not in RECIPES:
        raise ValueError(f"lora_linear_fp8: recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"lora_linear_fp8: x must be bf16 or fp16 (the compute dtype), got {x.dtype}")
    in_features = x.shape[-1]
    out_features, r = lora_b.shape
    shapes_ok = (
        weight_fp8.shape == (out_features, in_features)
        and weight_t_fp8.shape == (in_features, out_features)
        and lora_a.shape == (r, in_features)
    )
    if not shapes_ok:
        raise ValueError(
            f"lora_linear_fp8: shapes do not match: x {tuple(x.shape)}, weight_fp8 {tuple(weight_fp8.shape)}, "
            f"weight_t_fp8 {tuple(weight_t_fp8.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if weight_fp8.dtype != E4M3 or weight_t_fp8.dtype != E4M3:
        raise ValueError(f"lora_linear_fp8: FP8 weights must be e4m3, got {weight_fp8.dtype} / {weight_t_fp8.dtype}")
    rowwise = recipe == "rowwise"
    for name, inv, n in (("weight_inv_scale", weight_inv_scale, out_features),
                         ("weight_t_inv_scale", weight_t_inv_scale, in_features)):  # fmt: skip
        if inv.numel() != (n if rowwise else 1) or inv.dtype != torch.float32:
            raise ValueError(f"lora_linear_fp8: {recipe} {name} must be fp32 with {n if rowwise else 1} "
                             f"element(s), got {inv.dtype} {tuple(inv.shape)}")  # fmt: skip
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"lora_linear_fp8: bias {tuple(bias.shape)} != ({out_features},)")
    dtype = x.dtype
    x2d = x.reshape(-1, in_features)  # a view when possible; strides are passed to the kernel
    y, _ = lora_linear_fp8_fwd(
        x2d,
        weight_fp8,
        weight_inv_scale,
        weight_t_fp8,
        weight_t_inv_scale,
        bias.to(dtype) if bias is not None else None,
        lora_a.to(dtype),
        lora_b.to(dtype),
        float(scale),
        rowwise,
    )
    return y.reshape(*x.shape[:-1], out_features)
