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
