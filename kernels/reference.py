"""Plain-PyTorch references for the fused kernels, used by the parity tests and the benchmark.

Two kinds:

* ``*_reference``: what the reference trainer computes, in the input dtype, op for op
  (peft's LoRA linear; diffusers' ``CogVideoXDPMScheduler.add_noise`` / ``get_velocity`` and
  the CogVideo ``compute_loss``). Their error against ground truth is the "plain PyTorch in
  the same low precision" yardstick of the parity rule.
* ``*_reference_fp64``: the same formulas with every floating input cast to float64, the
  ground truth both the kernels and the low-precision references are measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "lora_linear_reference",
    "lora_linear_reference_fp64",
    "lora_linear_fp8_reference",
    "lora_linear_fp8_reference_fp64",
    "add_noise_reference",
    "add_noise_reference_fp64",
    "velocity_mse_loss_reference",
    "velocity_mse_loss_reference_fp64",
]


def _fp64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


# --------------------------------------------------------------------------- LoRA linear


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """peft's eager LoRA linear: ``base_layer(x) + lora_B(lora_A(x)) * scaling`` (no dropout).

    Four ops, each rounded to the input dtype; the [M, out] LoRA term is materialised.
    """
    result = F.linear(x, weight, bias)
    return result + F.linear(F.linear(x, lora_a), lora_b) * scale


def lora_linear_reference_fp64(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Ground truth: the same formula in float64 (differentiable through the casts)."""
    return lora_linear_reference(*_fp64(x, weight, bias, lora_a, lora_b), scale)


# --------------------------------------------------------------------------- LoRA linear on an FP8 base


def lora_linear_fp8_reference(
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
    """fastcog's unfused path: Fp8Linear's FP8 matmul (``_scaled_mm``, dx by its autograd) + bias, then
    peft's ``+ lora_B(lora_A(x)) * scaling``, all in x's dtype (adapters and bias cast to it)."""
    from fastcog.fast.fp8 import _Fp8LinearFn

    dtype = x.dtype
    x2d = x.reshape(-1, x.shape[-1])
    y = _Fp8LinearFn.apply(x2d, weight_fp8, weight_inv_scale, weight_t_fp8, weight_t_inv_scale, recipe == "rowwise")
    y = y.reshape(*x.shape[:-1], weight_fp8.shape[0])
    if bias is not None:
        y = y + bias.to(dtype)
    return y + F.linear(F.linear(x, lora_a.to(dtype)), lora_b.to(dtype)) * scale


class _DequantisedFp8Base(torch.autograd.Function):
    """fp64 ``x @ W.T`` on exactly the FP8 operands: q(x) and q(W) dequantised in fp64; dx = deq(q(dy)) @ deq(q(W^T)).T.

    x and dy are quantised by fastcog.fast.fp8.quantize (fp64 inputs holding bf16 / fp16 values quantise to
    the same bits as the values themselves): e4m3, dy e5m2 under tensorwise.
    """

    @staticmethod
    def forward(ctx, x, w, w_inv, wt, wt_inv, rowwise: bool):  # type: ignore[override]
        from fastcog.fast.fp8 import E4M3, quantize

        ctx.save_for_backward(wt, wt_inv)
        ctx.rowwise = rowwise
        xq, x_inv = quantize(x, E4M3, rowwise)
        return (xq.double() * x_inv.double()) @ (w.double() * w_inv.double().reshape(-1, 1)).T

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        from fastcog.fast.fp8 import E4M3, E5M2, quantize

        wt, wt_inv = ctx.saved_tensors
        dq, d_inv = quantize(dy, E4M3 if ctx.rowwise else E5M2, ctx.rowwise)
        dx = (dq.double() * d_inv.double()) @ (wt.double() * wt_inv.double().reshape(-1, 1)).T
        return dx, None, None, None, None, None


def lora_linear_fp8_reference_fp64(
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
    """Ground truth for the fused op from the same rounded inputs: the base term in fp64 on the quantised
    operands (``_DequantisedFp8Base``), the LoRA term and bias in fp64 on the unquantised x, as the kernels
    compute them. Pass x, bias and the adapters as fp64 leaves holding the compute-dtype values; the
    gradients are then exact for those operands."""
    x, bias, lora_a, lora_b = _fp64(x, bias, lora_a, lora_b)
    x2d = x.reshape(-1, x.shape[-1])
    y = _DequantisedFp8Base.apply(
        x2d, weight_fp8, weight_inv_scale, weight_t_fp8, weight_t_inv_scale, recipe == "rowwise"
    ).reshape(*x.shape[:-1], weight_fp8.shape[0])
    if bias is not None:
        y = y + bias
    return y + F.linear(F.linear(x, lora_a), lora_b) * scale


# --------------------------------------------------------------------------- diffusion objective


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against ``like`` (diffusers' flatten + unsqueeze)."""
    values = values.flatten()
    while values.dim() < like.dim():
        values = values.unsqueeze(-1)
    return values


def add_noise_reference(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """diffusers ``CogVideoXDPMScheduler.add_noise``: alphas_cumprod is cast to the latent
    dtype *before* the square roots, as diffusers does (lossy in bf16 near t = 0)."""
    abar = alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
    sqrt_alpha_prod = _per_sample(abar**0.5, latents)
    sqrt_one_minus_alpha_prod = _per_sample((1 - abar) ** 0.5, latents)
    return sqrt_alpha_prod * latents + sqrt_one_minus_alpha_prod * noise


def add_noise_reference_fp64(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    latents, noise, alphas_cumprod = _fp64(latents, noise, alphas_cumprod)
    return add_noise_reference(latents, noise, timesteps, alphas_cumprod)


def velocity_mse_loss_reference(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Objective step 8 of docs/reference.md, exactly as the reference trainer computes it.

    ``z0_hat = scheduler.get_velocity(v_hat, x_t, t)`` (alphas_cumprod cast to v_hat's dtype
    first); ``w = 1 / (1 - alphas_cumprod[t])`` in alphas_cumprod's own dtype (float64 from
    the scheduler), which promotes the weighted square, hence the loss, to that dtype;
    ``loss = mean_b(mean_{F,C,H,W}(w (z0_hat - z0)^2))``.
    """
    device = model_output.device
    timesteps = timesteps.to(device)
    abar_cast = alphas_cumprod.to(device=device, dtype=model_output.dtype)[timesteps]
    # get_velocity(sample=v_hat, noise=x_t): sqrt(abar) * x_t - sqrt(1 - abar) * v_hat
    z0_hat = (
        _per_sample(abar_cast**0.5, model_output) * noisy_latents
        - _per_sample((1 - abar_cast) ** 0.5, model_output) * model_output
    )
    weights = _per_sample(1 / (1 - alphas_cumprod.to(device)[timesteps]), z0_hat)
    batch = model_output.shape[0]
    loss = torch.mean((weights * (z0_hat - latents) ** 2).reshape(batch, -1), dim=1)
    return loss.mean()


def velocity_mse_loss_reference_fp64(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    model_output, noisy_latents, latents, alphas_cumprod = _fp64(
        model_output, noisy_latents, latents, alphas_cumprod
    )
    return velocity_mse_loss_reference(model_output, noisy_latents, latents, timesteps, alphas_cumprod)


def cogvideox_alphas_cumprod(snr_shift_scale: float = 3.0, steps: int = 1000) -> torch.Tensor:
    """alphas_cumprod of CogVideoXDPMScheduler as docs/reference.md describes it (float64, [steps]).

    scaled_linear betas 0.00085..0.012 (float64), the SNR shift ``abar / (s + (1 - s) abar)``,
    then the zero-terminal-SNR rescale, in diffusers' order. Test and benchmark inputs only;
    fastcog reads the real schedule from the checkpoint.
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
    # zero terminal SNR (Lin et al. 2023, Algorithm 1), on sqrt(abar): shift the last to 0,
    # scale the first back to its old value.
    sqrt_abar = abar.sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    return sqrt_abar**2
