"""The fused LoRA linear (fastcog.kernels.lora_linear) against cuBLAS plus addmm, forward and
forward + backward, with a frozen base (gradients for x, A and B only, as in training).

    fused     y = lora_linear(x, W, b, A, B, scale)        (Triton: S' = s x A.T, then x W.T + S' B.T + b)
    unfused   y = x @ W.T + b;  s = x @ A.T;  y.addmm_(s, B.T, alpha=scale)        (beta = 1)

Kernel configs: kernels/lora_linear.py autotunes ``_fused_mm_kernel`` over its ``_CONFIGS`` on a GPU
(one fixed config under the interpreter). The probe pins the first of them, with no autotuning, by
setting the Autotuner's ``configs`` to that one config for the section's duration: Triton's Autotuner
runs a single config without timing any. The split-K heuristic (``pick_split_k``) is the module's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from .timing import Timer

SCALE = 0.5  # alpha / r; its value does not change the work


def config_label(cfg: Any) -> str:
    k = cfg.kwargs
    return (f"BLOCK {k.get('BLOCK_M')}x{k.get('BLOCK_N')}x{k.get('BLOCK_K')}, GROUP_M {k.get('GROUP_M')}, "
            f"{cfg.num_warps} warps, {cfg.num_stages} stages")


def pin_first_config() -> tuple[dict[str, Any], Callable[[], None]]:
    """Pin the kernel to its first config; returns what was pinned and the function that restores the list."""
    module = importlib.import_module("fastcog.kernels.lora_linear")
    tuned = module._fused_mm_tuned
    configs = list(tuned.configs)
    tuned.configs = configs[:1]

    def restore() -> None:
        tuned.configs = configs

    how = ("the module's only config" if len(configs) == 1 else
           f"the first of the module's {len(configs)} configs, pinned: Autotuner.configs set to it alone, "
           "no autotuning")
    return {"config": config_label(configs[0]), "configs_in_module": len(configs), "how": how}, restore


def _tensors(m: int, k: int, n: int, r: int, device: torch.device) -> dict[str, torch.Tensor]:
    def rnd(*shape: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * std).to(torch.bfloat16).requires_grad_(grad)

    return {"x": rnd(m, k, grad=True), "w": rnd(n, k, std=k**-0.5), "b": rnd(n),
            "a": rnd(r, k, std=k**-0.5, grad=True), "bb": rnd(n, r, std=r**-0.5, grad=True), "dy": rnd(m, n)}


def fused(t: dict[str, torch.Tensor]) -> torch.Tensor:
    from fastcog.kernels import lora_linear

    return lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], SCALE)


def unfused(t: dict[str, torch.Tensor]) -> torch.Tensor:
    y = torch.addmm(t["b"], t["x"], t["w"].t())
    s = t["x"] @ t["a"].t()
    return y.addmm_(s, t["bb"].t(), alpha=SCALE)


def measure(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], backward: bool, m: int, k: int, n: int,
            r: int, device: torch.device, timer: Timer) -> dict[str, Any]:
    t = _tensors(m, k, n, r, device)
    if backward:
        def step():
            return torch.autograd.grad(forward(t), (t["x"], t["a"], t["bb"]), t["dy"])
    else:
        def step():
            return forward(t)
    return timer(step)


def ratios(shape: dict[str, Any]) -> None:
    """fused / unfused ms per direction, into the shape's dict (None unless both were measured)."""
    for direction in ("forward", "forward_backward"):
        f, u = shape.get(f"fused_{direction}", {}), shape.get(f"unfused_{direction}", {})
        ok = f.get("status") == "ok" and u.get("status") == "ok"
        shape[f"fused_over_unfused_{direction}"] = round(f["ms"] / u["ms"], 3) if ok else None
