"""GEMM rates at the CogVideoX linear shapes: bf16 through cuBLAS, and FP8 e4m3 through torch._scaled_mm
called as fastcog/fast/fp8.py's forward calls it.

``x [M, K] @ W.T`` with W [N, K]. FP8: both operands quantised by fastcog's own ``quantize`` (row-major
e4m3; rowwise scales are powers of two), the second operand passed as the column-major view ``W_q.t()``,
inverse scales ``[M, 1]`` / ``[1, N]`` fp32 (rowwise) or scalars (tensorwise), bf16 output, fast
accumulation on (the forward GEMM's setting). The timing covers the GEMM only: the activation
quantisation the trainer also runs (fused into neighbouring kernels under torch.compile) is not in it.
FLOPs: 2*M*K*N.
"""

from __future__ import annotations

from typing import Any

import torch

from .timing import Timer, tflops

RECIPES = ("rowwise", "tensorwise")
NOTE = ("x @ W.T, TFLOP/s from 2*M*K*N; FP8 e4m3 via torch._scaled_mm as fastcog's forward calls it (W_q.t() "
        "column-major, fast accumulation, bf16 out), operands quantised beforehand: the GEMM alone")


def _operands(m: int, k: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=device) * k**-0.5).to(torch.bfloat16)
    return x, w


def bf16(m: int, k: int, n: int, device: torch.device, timer: Timer) -> dict[str, Any]:
    x, w = _operands(m, k, n, device)
    timed = timer(lambda: x @ w.t())
    return {**timed, "tflops": tflops(2 * m * k * n, timed["ms"])}


def fp8(m: int, k: int, n: int, recipe: str, device: torch.device, timer: Timer) -> dict[str, Any]:
    from fastcog.fast.fp8 import E4M3, quantize

    rowwise = recipe == "rowwise"
    x, w = _operands(m, k, n, device)
    xq, x_inv = quantize(x, E4M3, rowwise)
    wq, w_inv = quantize(w, E4M3, rowwise)
    if rowwise:
        w_inv = w_inv.reshape(1, -1)  # [N, 1] per output row of W -> [1, N] per column of W.T
    del x, w

    def gemm() -> torch.Tensor:
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    timed = timer(gemm)
    return {**timed, "tflops": tflops(2 * m * k * n, timed["ms"]), "scale_a": list(x_inv.shape),
            "scale_b": list(w_inv.shape)}
