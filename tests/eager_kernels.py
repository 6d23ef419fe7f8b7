"""Test-only eager stand-ins for the Triton launches inside fastcog's custom ops.

`use_eager_kernels(monkeypatch)` swaps the launchers that the custom ops call (``fused_mm`` of
fastcog.kernels.lora_linear; ``quantize_lora``, ``fp8_lora_mm`` and ``fused_mm`` as
fastcog.kernels.lora_linear_fp8 calls them; the ``launch_*`` functions of
fastcog.kernels.diffusion_loss) for plain PyTorch with the same contract: the same arguments, the
same output dtype and layout, fp32 accumulation, the FP8 quantisation of fastcog.fast.fp8.quantize
bit for bit, and fp64 per-sample loss coefficients. Everything above the launchers stays under
test: ``fastcog::lora_linear_fwd`` / ``_bwd``, ``fastcog::lora_linear_fp8_fwd`` / ``_bwd`` and
``fastcog::velocity_mse_loss_fwd`` / ``_bwd`` (dispatch, fake impls, registered autograd, which
gradients are asked for, the casts of fp32 adapters to the compute dtype), fastcog.fast.lora's
routing and the fused loss in the objective. What is not under test is the Triton code itself:
tests/kernels checks it on its own, and tests/test_fast_path.py runs it interpreted, end to end, on
one variant.

The custom ops look their launchers up in their modules' globals at call time, so patching
the module attribute is enough (kernels/lora_linear.py keeps `_lora_forward` / `_lora_backward`
beside ``fused_mm``, kernels/lora_linear_fp8.py `_lora_fp8_forward` / `_lora_fp8_backward` beside its
launchers, for that reason).
"""

from __future__ import annotations

import importlib

import pytest
import torch


def fused_mm(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, alpha: float = 1.0, split_k: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * (a1 @ b1 + a2 @ b2) + bias`` with fp32 accumulation, in a1's dtype (the launcher's contract)."""
    acc = a1.float() @ b1.float()
    if a2 is not None:
        acc = acc + a2.float() @ b2.float()
    acc = acc * alpha
    if bias is not None:
        acc = acc + bias.float()
    if out is None:
        return acc.to(a1.dtype)
    return out.copy_(acc)


def quantize_lora(x: torch.Tensor, lora: torch.Tensor, lora_scale: float, fp8_dtype: torch.dtype,
                  rowwise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, inv, s)``: fastcog.fast.fp8.quantize(x) ([M, 1] or [] fp32 inv) and lora_scale * x @ lora in x's dtype."""
    from fastcog.fast.fp8 import quantize

    m, r = x.shape[0], lora.shape[1]
    if m == 0:
        return (torch.empty(x.shape, dtype=fp8_dtype, device=x.device),
                torch.ones((0, 1) if rowwise else (), device=x.device), x.new_empty(0, r))
    q, inv = quantize(x, fp8_dtype, rowwise)
    s = ((x.float() @ lora.float()) * lora_scale).to(x.dtype)
    return q, inv, s


def fp8_lora_mm(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor, s: torch.Tensor,
                lora: torch.Tensor, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    """``(a8 @ b8.T) * a_inv * b_inv + s @ lora + bias`` with fp32 accumulation, in s's dtype (the FP8 products
    are exact in fp32; the accumulation precision is the kernel's concern, not the contract's)."""
    acc = (a8.float() @ b8.float().t()) * a_inv.reshape(-1, 1) * b_inv.reshape(1, -1)
    acc = acc + s.float() @ lora.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(s.dtype)


def _coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor):
    """fp64 sqrt(abar), sqrt(1 - abar), 1 / (1 - abar) per sample, shaped [B, 1, ...] (as the kernels)."""
    abar = alphas_cumprod.to(device=like.device, dtype=torch.float64)[timesteps.to(like.device)]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape), (1 / (1 - abar)).view(shape)


def _residual(v, x_t, z0, c_x, c_v):
    return c_x.float() * x_t.float() - c_v.float() * v.float() - z0.float()


def launch_add_noise(latents, noise, timesteps, alphas_cumprod, out=None):
    c_x, c_e, _ = _coefficients(timesteps, alphas_cumprod, latents)
    x_t = (c_x.float() * latents.float() + c_e.float() * noise.float()).to(latents.dtype).contiguous()
    return x_t if out is None else out.copy_(x_t)


def launch_velocity_mse_loss(model_output, noisy_latents, latents, timesteps, alphas_cumprod):
    c_x, c_v, w = _coefficients(timesteps, alphas_cumprod, model_output)
    d = _residual(model_output, noisy_latents, latents, c_x, c_v)
    per_sample = d.square().flatten(1).sum(1, dtype=torch.float64) * w.flatten()
    return (per_sample.sum() / model_output.numel()).float()


def launch_velocity_mse_loss_backward(grad_loss, model_output, noisy_latents, latents, timesteps, alphas_cumprod,
                                      out=None):
    c_x, c_v, w = _coefficients(timesteps, alphas_cumprod, model_output)
    coef = (-2.0 / model_output.numel() * grad_loss.double() * w * c_v).float()
    grad = (coef * _residual(model_output, noisy_latents, latents, c_x, c_v)).to(model_output.dtype).contiguous()
    return grad if out is None else out.copy_(grad)


def use_eager_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch every Triton launcher under fastcog's custom ops (undone with `monkeypatch`); return what was patched."""
    patched = []
    for module_name, names in (("fastcog.kernels.lora_linear", ["fused_mm"]),
                               ("fastcog.kernels.lora_linear_fp8", ["quantize_lora", "fp8_lora_mm", "fused_mm"]),
                               ("fastcog.kernels.diffusion_loss", ["launch_add_noise", "launch_velocity_mse_loss",
                                                                   "launch_velocity_mse_loss_backward"])):
        module = importlib.import_module(module_name)
        for name in names:
            assert callable(getattr(module, name)), f"{module_name}.{name} is gone: update tests/eager_kernels.py"
            monkeypatch.setattr(module, name, globals()[name])
            patched.append(f"{module_name}.{name}")
    return patched
