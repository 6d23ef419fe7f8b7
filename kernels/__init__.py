"""Triton kernels (fastcog.kernels): fused LoRA linear and fused diffusion objective.

Public API (docs/design.md, "Interfaces"):

* ``lora_linear(x, weight, bias, lora_a, lora_b, scale)``
* ``add_noise(latents, noise, timesteps, alphas_cumprod)``
* ``velocity_mse_loss(model_output, noisy_latents, latents, timesteps, alphas_cumprod)``

Each is a torch.library custom op (namespace ``fastcog``) with a fake implementation and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
Plain-PyTorch references live in ``fastcog.kernels.reference``.

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set before this package is first
imported (the CPU test tier does that in tests/conftest.py).
"""

# Only ever define the ops as fastcog.kernels. With the repository root on sys.path (pytest's
# rootdir insertion, `python -m` from the checkout), transformers' and diffusers' probes for the
# PyPI package `kernels` import this directory as a top-level `kernels`. Executing the modules a
# second time would re-run torch.library.custom_op("fastcog::..."), which destroys the first
# registration and leaves fastcog.kernels' op handles dangling (use after free: random
# "ValueError: vector::reserve" in later calls). Under any other name this package is empty.
if __name__ == "fastcog.kernels":
    from .diffusion_loss import add_noise, velocity_mse_loss
    from .lora_linear import lora_linear

    __all__ = ["lora_linear", "add_noise", "velocity_mse_loss"]
else:
    __all__ = []
