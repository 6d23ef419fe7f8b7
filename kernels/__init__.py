"""Triton kernels (fastcog.kernels): fused LoRA linear and fused diffusion objective.

Public API (docs/design.md, "Interfaces"):

* ``lora_linear(x, weight, bias, lora_a, lora_b, scale)``
* ``lora_linear_fp8(x, weight_fp8, weight_inv_scale, weight_t_fp8, weight_t_inv_scale, bias, lora_a, lora_b,
  scale, recipe)``: the same on a frozen FP8 base as ``fastcog.fast.fp8.Fp8Linear`` stores it
* ``add_noise(latents, noise, timesteps, alphas_cumprod)``
* ``velocity_mse_loss(model_output, noisy_latents, latents, timesteps, alphas_cumprod)``

Each is a torch.library custom op (namespace ``fastcog``) with a fake implementation and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
Plain-PyTorch references live in ``fastcog.kernels.reference``.

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set before this package is first
imported (the CPU test tier does that in tests/conftest.py).
"""

# Only ever define the ops as fastcog.kernels. With the repository root on sys.path (pytest's
# rootdir insertion, `python -m` from the checkout), this directory shadows the PyPI package
# `kernels`, which transformers imports when it is installed. Executing these modules a second
# time would re-run torch.library.custom_op("fastcog::..."), which destroys the first
# registration and leaves fastcog.kernels' op handles dangling (use after free: random
# "ValueError: vector::reserve" in later calls). Under any other name this package registers
# nothing and hands the name to the PyPI package when one is installed, else stays empty.
if __name__ == "fastcog.kernels":
    from .diffusion_loss import add_noise, velocity_mse_loss
    from .lora_linear_fp8_op import lora_linear_fp8
    from .lora_linear_op import lora_linear

    __all__ = ["lora_linear", "lora_linear_fp8", "add_noise", "velocity_mse_loss"]
else:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or ".") != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        # The import system returns whatever sys.modules holds for the name once this file has
        # run, so the installed package replaces this one for every importer.
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    __all__ = []
