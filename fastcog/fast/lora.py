"""Route each of peft's LoRA linears through one of three implementations of the same function.

    fused     one Triton kernel folds the LoRA term into the base GEMM: fastcog.kernels.lora_linear on a
              plain nn.Linear base, fastcog.kernels.lora_linear_fp8 on an Fp8Linear base (fastcog.fast.fp8)
    unfused   the base GEMM exactly as the base module runs it (cuBLAS F.linear, or Fp8Linear's _scaled_mm),
              then S = x @ A.T and ``y.addmm_(S, B.T, alpha=s)`` into its output: plain torch autograd
    peft      peft's own forward, untouched (the reference)

peft computes ``base(x) + lora_B(lora_A(x)) * s``: three GEMMs, an [M, out] LoRA temporary and an add.
The unfused form adds the rank-wide product into the base output in place (no [M, out] temporary);
the fused form also saves the second pass over the output. Which one is fastest depends on the GPU and
the shape: fastcog.fast.lora_choice decides per shape. Only each peft `Linear`'s `forward` is replaced
(an instance attribute), so the module tree, the parameter names, the checkpoint and the diffusers
export are exactly those of the reference path.

Dtypes: fused and unfused compute in one dtype and cast the base weight (plain base), bias and fp32
adapters to it; the adapter gradients flow back through that cast into the fp32 master weights.
Under autocast that dtype is the autocast dtype, as autocast gives peft's three linears, so frozen
weights kept in fp32 under bf16 autocast still compute in bf16. Without autocast it is the base
weight's dtype (plain base) or Fp8Linear's own rule (x's dtype when bf16 / fp16, else the dtype the
weight had), and an FP8 base's output comes back in x's dtype, as Fp8Linear returns it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastcog.fast.fp8 import Fp8Linear
from fastcog.lora import ADAPTER_NAME

IMPLEMENTATIONS = ("fused", "unfused", "peft")
"""What a LoRA linear can run; fastcog.fast.lora_choice picks one per shape."""
LABELS = ("fused", "fused-fp8", "unfused", "unfused-fp8", "peft")
"""The build report's counts: the implementation, ``-fp8`` when the base is an Fp8Linear."""
_HALF = (torch.bfloat16, torch.float16)


def base_kind(module: nn.Module) -> str | None:
    """``linear`` (a plain nn.Linear base), ``fp8-rowwise`` / ``fp8-tensorwise`` (an Fp8Linear base), or None."""
    base = getattr(module, "base_layer", None)
    if type(base) is nn.Linear:
        return "linear"
    if isinstance(base, Fp8Linear):
        return f"fp8-{base.recipe}"
    return None


def fusable(module: nn.Module) -> bool:
    """A peft LoRA Linear that the fused and unfused forwards reproduce exactly.

    One active adapter, no dropout, not merged, no LoRA variant (DoRA, ...), and a base that is a
    plain nn.Linear or an Fp8Linear (an Fp8StorageLinear or another module keeps peft's forward).
    """
    from peft.tuners.lora import Linear as LoraLinear

    return (
        isinstance(module, LoraLinear)
        and list(module.active_adapters) == [ADAPTER_NAME]
        and not module.merged
        and not module.disable_adapters
        and isinstance(module.lora_dropout[ADAPTER_NAME], nn.Identity)
        and ADAPTER_NAME not in module.lora_variant
        and base_kind(module) is not None
    )


def lora_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every peft LoRA Linear in `model` (fusable or not), by name."""
    from peft.tuners.lora import Linear as LoraLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    # The meta device (`fastcog plan`) has no autocast state to ask.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        return dtype
    if isinstance(base, Fp8Linear):  # Fp8Linear's rule (fastcog.fast.fp8, "Dtypes")
        return x.dtype if x.dtype in _HALF else base.compute_dtype
    return base.weight.dtype


def _output(y: torch.Tensor, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """As the base module would return it: Fp8Linear casts back to x's dtype outside autocast."""
    if isinstance(base, Fp8Linear) and _autocast_dtype(x.device.type) is None:
        return y.to(x.dtype)
    return y


def _adapters(self: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    return (self.lora_A[ADAPTER_NAME].weight.to(dtype), self.lora_B[ADAPTER_NAME].weight.to(dtype),
            self.scaling[ADAPTER_NAME])


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.base_layer
    dtype = _compute_dtype(base, x)
    xc = x.to(dtype)
    lora_a, lora_b = self.lora_A[ADAPTER_NAME].weight, self.lora_B[ADAPTER_NAME].weight
    scale = self.scaling[ADAPTER_NAME]
    if isinstance(base, Fp8Linear):
        from fastcog.kernels import lora_linear_fp8

        y = lora_linear_fp8(xc, base.weight_fp8, base.weight_inv_scale, base.weight_t_fp8, base.weight_t_inv_scale,
                            base.bias, lora_a, lora_b, scale, base.recipe)
    else:
        from fastcog.kernels import lora_linear

        y = lora_linear(xc, base.weight, base.bias, lora_a, lora_b, scale)
    return _output(y, base, x)


def _unfused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.base_layer
    dtype = _compute_dtype(base, x)
    xc = x.to(dtype)
    y = base(xc)  # F.linear or Fp8Linear's _scaled_mm: in dtype, fresh, contiguous
    lora_a, lora_b, scale = _adapters(self, dtype)
    s = F.linear(xc, lora_a).reshape(-1, lora_a.shape[0])  # [M, r]
    if y.dtype == dtype and y.is_contiguous():
        # In place into the base output: no [M, out] temporary (neither base GEMM saves its output).
        y.view(-1, y.shape[-1]).addmm_(s, lora_b.t(), alpha=scale)
    else:
        y = torch.addmm(y.reshape(-1, y.shape[-1]).to(dtype), s, lora_b.t(), alpha=scale).reshape(y.shape)
    return _output(y, base, x)


_FORWARDS = {"fused": _fused_forward, "unfused": _unfused_forward}


def label(module: nn.Module) -> str:
    """This LoRA linear's implementation as the build report counts it (LABELS)."""
    forward = vars(module).get("forward")
    impl = next((k for k, f in _FORWARDS.items() if getattr(forward, "__func__", None) is f), "peft")
    return impl if impl == "peft" or not isinstance(module.base_layer, Fp8Linear) else f"{impl}-fp8"


def route_lora(model: nn.Module, choose: Callable[[str, nn.Module], str] | Mapping[str, str]) -> dict[str, str]:
    """Give every fusable LoRA linear the implementation that `choose(name, module)` (or `choose[name]`) names.

    Returns every peft LoRA linear's label (LABELS), by name: the ones that are not fusable keep peft's
    forward. ``peft`` removes a forward an earlier call installed.
    """
    pick = choose.__getitem__ if isinstance(choose, Mapping) else choose
    labels = {}
    for name, module in lora_linears(model):
        if fusable(module):
            impl = pick(name) if isinstance(choose, Mapping) else pick(name, module)
            if impl not in IMPLEMENTATIONS:
                raise ValueError(f"LoRA implementation {impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
            if impl == "peft":
                vars(module).pop("forward", None)
            else:
                module.forward = types.MethodType(_FORWARDS[impl], module)
        labels[name] = label(module)
    return labels


def use_fused_lora(model: nn.Module) -> list[str]:
    """Make every fusable LoRA linear in `model` use the fused kernel; return their names."""
    return [name for name, lab in route_lora(model, lambda name, module: "fused").items() if lab != "peft"]
