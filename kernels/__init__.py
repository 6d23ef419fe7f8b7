"""Triton kernels (fastcog.kernels): fused LoRA linear and fused diffusion objective.

Public API (DESIGN.md "Interfaces"):

* ``lora_linear(x, weight, bias, lora_a, lora_b, scale)``
* ``add_noise(latents, noise, timesteps, alphas_cumprod)``
* ``velocity_mse_loss(model_output, noisy_latents, latents, timesteps, alphas_cumprod)``

Each is a torch.library custom op (namespace ``fastcog``) with a fake implementation and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
Plain-PyTorch references live in ``fastcog.kernels.reference``.

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set before this package is first
imported (the CPU test tier does that in tests/conftest.py).
"""

from .diffusion_loss import add_noise, velocity_mse_loss
from .lora_linear import lora_linear

__all__ = ["lora_linear", "add_noise", "velocity_mse_loss"]
