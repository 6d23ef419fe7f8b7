"""Route peft's LoRA linears through the fused Triton `lora_linear` kernel.

peft computes ``base(x) + lora_B(lora_A(x)) * s``: three GEMMs, an [M, out] LoRA temporary and
an add, and in backward a second pass over dy for lora_B. The fused kernel folds the LoRA term
into the base GEMM (kernels/lora_linear.py). Only each peft `Linear`'s `forward` is replaced
(an instance attribute), so the module tree, the parameter names, the checkpoint and the
diffusers export are exactly those of the reference path.

Dtypes: the kernel computes in the input's dtype and casts the base weight, bias and fp32
adapters to it; the adapter gradients flow back through that cast into the fp32 master
weights. Under autocast the input is cast to the autocast dtype, as autocast does for peft's
three linears, so frozen weights kept in fp32 under bf16 autocast still compute in bf16 (in the
base weight's dtype they would run the kernel in fp32, about twice as slow as peft). Without
autocast the input is cast to the base weight's dtype (frozen weights stored in the compute dtype).
"""

from __future__ import annotations

import types

import torch

from fastcog.lora import ADAPTER_NAME


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from fastcog.kernels import lora_linear

    base = self.base_layer
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = base.weight.dtype
    x = x.to(dtype)
    return lora_linear(x, base.weight, base.bias, self.lora_A[ADAPTER_NAME].weight,
                       self.lora_B[ADAPTER_NAME].weight, self.scaling[ADAPTER_NAME])


def fusable(module: torch.nn.Module) -> bool:
    """A peft LoRA Linear whose forward the fused kernel reproduces exactly.

    One active adapter, no dropout, not merged, a plain nn.Linear base (an FP8 base is not
    fused: its GEMM is _scaled_mm, not this kernel).
    """
    from peft.tuners.lora import Linear as LoraLinear

    return (
        isinstance(module, LoraLinear)
        and list(module.active_adapters) == [ADAPTER_NAME]
        and not module.merged
        and not module.disable_adapters
        and isinstance(module.lora_dropout[ADAPTER_NAME], torch.nn.Identity)
        and ADAPTER_NAME not in module.lora_variant
        and type(module.base_layer) is torch.nn.Linear
    )


def use_fused_lora(model: torch.nn.Module) -> list[str]:
    """Make every fusable LoRA linear in `model` use the fused kernel; return their names."""
    patched = []
    for name, module in model.named_modules():
        if fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            patched.append(name)
    return patched
