"""Attention: SDPA's own choice of kernel, and each backend timed forward and forward + backward.

Backend names are fastcog's (fastcog/fast/attention.py), so auto's pick compares with the measured
ones directly: cudnn, flash, efficient (SDPA restricted to that one kernel with ``sdpa_kernel``), fa3
(``flash_attn_interface``, FlashAttention-3) and flash_attn (flash-attn 2). SDPA's math kernel is left
out: at the real shape its [H, S, S] score matrix alone is 48 x 17,776^2 elements, 30 GB in bf16.

Layouts: SDPA takes contiguous [B, H, S, D]; the flash-attn libraries contiguous [B, S, H, D] (what
fastcog's processor hands them). q, k, v require grad, as in training, for the choice and for both
timings. FLOPs: forward 4*B*H*S^2*D (QK^T and PV); forward + backward 3.5x that (backward 2.5x forward:
five S^2-sized products instead of two).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .record import OK, Unavailable
from .timing import Timer, tflops

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
LIBRARIES = {"fa3": "flash_attn_interface", "flash_attn": "flash_attn"}
BACKENDS = (*SDPA_KERNELS, *LIBRARIES)
CPU_KERNELS = ("flash",)  # SDPA's flash kernel has a CPU implementation; cudnn and efficient are CUDA-only
BACKWARD_FACTOR = 3.5


def backend_name(index: int) -> str:
    """SDPBackend's member name for the int torch._fused_sdp_choice returns."""
    for name, member in SDPBackend.__members__.items():
        if int(member) == index:
            return name
    return f"unknown ({index})"


def _qkv(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
         heads_second: bool = True) -> list[torch.Tensor]:
    b, h, s, d = shape
    dims = (b, h, s, d) if heads_second else (b, s, h, d)
    return [torch.randn(dims, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def sdpa_choice(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Which kernel F.scaled_dot_product_attention would run for q, k, v of this shape (no mask, not causal)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        raise Unavailable(f"torch {torch.__version__} has no torch._fused_sdp_choice")
    q, k, v = _qkv(shape, dtype, device)
    index = int(choose(q, k, v))
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "index": index,
            "backend": backend_name(index)}


def attention_fn(name: str, device: torch.device) -> tuple[Callable[..., torch.Tensor], bool]:
    """(q, k, v) -> out for the backend, and whether it takes [B, H, S, D] (else [B, S, H, D])."""
    if name in SDPA_KERNELS:
        if device.type != "cuda" and name not in CPU_KERNELS:
            raise Unavailable(f"SDPA's {name} kernel needs CUDA")
        kind = SDPA_KERNELS[name]

        def sdpa(q, k, v):
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q, k, v)

        return sdpa, True
    module = LIBRARIES[name]
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{module} is not installed")
    if device.type != "cuda":
        raise Unavailable(f"{module} needs CUDA")
    if name == "fa3":
        from flash_attn_interface import flash_attn_func as fa3

        def run_fa3(q, k, v):
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE

        return run_fa3, False
    from flash_attn import flash_attn_func as fa2

    return fa2, False


def time_backend(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                 timer: Timer, backward: bool) -> dict[str, Any]:
    attend, heads_second = attention_fn(name, device)
    q, k, v = _qkv(shape, dtype, device, heads_second)
    if backward:
        grad_out = torch.randn_like(q)

        def step():
            return torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)
    else:

        def step():
            return attend(q, k, v)

    b, h, s, d = shape
    flops = 4 * b * h * s * s * d * (BACKWARD_FACTOR if backward else 1.0)
    timed = timer(step)
    return {**timed, "tflops": tflops(flops, timed["ms"]),
            "layout": "[B, H, S, D]" if heads_second else "[B, S, H, D]"}


def auto_choice(device: torch.device) -> dict[str, Any]:
    from fastcog.fast.attention import choose_backend

    choice = choose_backend("auto", device)
    return {"backend": choice.backend, "reason": choice.reason}


def summarize(backends: dict[str, dict[str, Any]], auto: dict[str, Any]) -> dict[str, Any]:
    """The fastest backend per direction among those measured, and how auto's pick compares."""
    out: dict[str, Any] = {}
    pick = auto.get("backend") if auto.get("status") == OK else None
    for direction in ("forward", "forward_backward"):
        timed = {n: r[direction]["ms"] for n, r in backends.items() if r.get(direction, {}).get("status") == OK}
        fastest = min(timed, key=timed.get) if timed else None
        out[direction] = {
            "fastest": fastest,
            "fastest_ms": timed.get(fastest),
            "auto": pick,
            "auto_ms": timed.get(pick),
            # None when auto's pick was not measured here (e.g. SDPA's own choice on CPU)
            "auto_over_fastest": round(timed[pick] / timed[fastest], 3) if pick in timed else None,
            "auto_is_fastest": (pick == fastest) if pick in timed else None,
        }
    return out
