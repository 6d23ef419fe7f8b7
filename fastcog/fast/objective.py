"""The fused objective: the reference objective with the noising and the loss in Triton.

It inherits everything else from the reference (the RNG draws in the same order, I2V image
conditioning, 1.5 frame padding, RoPE), so from the same seed it sees the same timesteps
and noise. Only two steps differ: `x_t = sqrt(abar) z0 + sqrt(1 - abar) eps` is one kernel
instead of the scheduler's broadcast ops, and the velocity loss is one pass forward and one
pass backward with fp32 accumulation instead of get_velocity, a weight tensor, a square, two
means and their full-size temporaries. The loss comes back in fp32 where the reference's is
float64 (its weights are float64).
"""

from __future__ import annotations

import torch

from fastcog.objective import ReferenceObjective


class FusedObjective(ReferenceObjective):
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from fastcog.kernels import add_noise

        return add_noise(latents, noise, timesteps, self.scheduler.alphas_cumprod)

    def loss(self, v_hat: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
        from fastcog.kernels import velocity_mse_loss

        return velocity_mse_loss(v_hat, noisy, latents, timesteps, self.scheduler.alphas_cumprod)
