"""The fused velocity loss: one Triton pass forward and one backward.

It replaces get_velocity, a weight tensor, a square, two means and their full-size
temporaries, with fp32 accumulation and fp64 per-sample coefficients. The kernel reads the
transformer's bf16/fp16 output directly and upcasts each value in registers, so no fp32 copy
of the prediction is made. The loss comes back in fp32 where the reference's is float64 (its
weights are float64).

The noising stays the scheduler's `add_noise` in the latents' dtype, as the reference runs it:
the fp64-coefficient `fastcog.kernels.add_noise` would be closer to exact arithmetic, but in
bf16 it changes the loss at small t by up to 3x (docs/numerics.md), for no measurable time
(one elementwise pass over the latents).
"""

from __future__ import annotations

from typing import Any

import torch


def fused_velocity_loss(scheduler: Any, v_hat: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
    from fastcog.kernels import velocity_mse_loss

    return velocity_mse_loss(v_hat, noisy, latents, timesteps, scheduler.alphas_cumprod)
