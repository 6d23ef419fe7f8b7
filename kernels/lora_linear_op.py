"""Custom ops, autograd and the public ``lora_linear`` over the fused LoRA GEMMs.

The math, fusion and kernel live in ``lora_linear`` (kernel -> ``fused_mm`` launcher ->
``_lora_forward`` / ``_lora_backward``). This module wraps those launch sequences as
torch.library custom ops (``fastcog::lora_linear_fwd`` / ``fastcog::lora_linear_bwd``) with
fake impls and a registered autograd formula, so torch.compile(fullgraph=True) traces through
without a graph break, and exposes ``lora_linear``, which checks shapes, flattens leading dims
and casts parameters to x's dtype.
"""

from __future__ import annotations

import torch

# Importing .lora_linear runs _common's package check first (kernels/__init__.py): under any
# name but fastcog.kernels this raises before the custom ops below are registered.
from .lora_linear import _lora_backward, _lora_forward

__all__ = ["lora_linear"]


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op(
    "fastcog::lora_linear_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale)"
    " -> (Tensor, Tensor)",
)
def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale):
    return _lora_forward(x, weight, bias, lora_a, lora_b, scale)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op(
    "fastcog::lora_linear_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor s, float scale,"
    " bool need_x, bool need_w, bool need_bias, bool need_a, bool need_b)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scale, need_x, need_w, need_bias, need_a, need_b):
    return _lora_backward(dy, x, weight, lora_a, lora_b, s, scale, need_x, need_w, need_bias, need_a, need_b)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, s, scale, need_x, need_w, need_bias, need_a, need_b):
    def maybe(flag: bool, *shape: int) -> torch.Tensor:
        return dy.new_empty(shape) if flag else dy.new_empty(0)

    return (
        maybe(need_x, *x.shape),
        maybe(need_w, *weight.shape),
        maybe(need_bias, weight.shape[0]),
        maybe(need_a, *lora_a.shape),
        maybe(need_b, *lora_b.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale = inputs
    _, s = output
    # weight is saved by reference only (it is a parameter): no extra memory. Only S' (rank
    # wide) is a new activation; the output y is not saved.
    ctx.save_for_backward(x, weight, lora_a, lora_b, s)
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(s)


def _backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, s = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
    need_bias = bool(need_bias and ctx.has_bias)
    dx, dw, db, da, dbb = lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, s, ctx.scale, need_x, need_w, need_bias, need_a, need_b
    )
    return (
        dx if need_x else None,
        dw if need_w else None,
        db if need_bias else None,
        da if need_a else None,
        dbb if need_b else None,
        None,
    )


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T`` with fused Triton kernels.

    x ``[..., in]``; weight ``[out, in]``; bias ``[out]`` or None; lora_a ``[r, in]``;
    lora_b ``[out, r]``. Computes in x's dtype (fp32, bf16 or fp16) with fp32 accumulation;
    parameters in another dtype (e.g. fp32 LoRA master weights) are cast to it, and their
    gradients flow back through that cast in their own dtype. Differentiable in x, lora_a,
    lora_b, and in weight / bias when they require grad (a frozen base never computes dW).
    """
    in_features = x.shape[-1]
    out_features, r = lora_b.shape
    if weight.shape != (out_features, in_features) or lora_a.shape != (r, in_features):
        raise ValueError(
            f"lora_linear: shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} != ({out_features},)")
    dtype = x.dtype
    x2d = x.reshape(-1, in_features)  # a view when possible; strides are passed to the kernel
    y, _ = lora_linear_fwd(
        x2d,
        weight.to(dtype),
        bias.to(dtype) if bias is not None else None,
        lora_a.to(dtype),
        lora_b.to(dtype),
        float(scale),
    )
    return y.reshape(*x.shape[:-1], out_features)
