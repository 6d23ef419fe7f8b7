"""Fused base + LoRA linear layer, forward and backward, in Triton.

Math (s = LoRA scale, usually alpha / r)::

    x  [M, in]   (any leading dims are flattened into M; strides are honoured, no copy)
    W  [out, in] b [out] (optional)   A [r, in]   B [out, r]

    forward    S' = s * (x @ A.T)                        [M, r]    saved for backward
               y  = x @ W.T + S' @ B.T + b                [M, out]
    backward   G' = s * (dy @ B)                         [M, r]    computed once, used twice
               dx = dy @ W + G' @ A                       [M, in]
               dA = G'.T @ x         (= s (dy @ B).T x)   [r, in]
               dB = dy.T @ S'        (= s dy.T (x A.T))   [out, r]
               dW = dy.T @ x, db = sum_M dy               only when W / b require grad

Fusion. One generic kernel computes ``C = alpha * (A1 @ B1 + A2 @ B2) + bias`` with fp32
accumulation; every product above is one launch of it:

* the LoRA up-projection is folded into the base GEMM as extra K iterations: after the
  ``in``-long loop over x @ W.T the same accumulator runs an ``r``-long loop over S' @ B.T,
  and the bias is added in the epilogue. The LoRA output never exists as an [M, out] tensor.
* dx is the same kernel on (dy, W) and (G', A): the LoRA part of the input gradient costs
  r extra K iterations instead of an [M, in] temporary and an add.
* S' and G' carry the scale (applied once, in the fp32 epilogue of the rank-wide GEMM), so
  the fused loops need no second accumulator and dA, dB need no scaling pass.
* S' = s x A.T is saved from the forward, never recomputed; G' = s dy @ B is computed once.
* A frozen base never computes dW / db (the autograd layer asks only for the gradients that
  ``needs_input_grad`` flags).
* The weight-gradient GEMMs (dA, dB, dW) reduce over M (17,776 tokens at 49x480x720) but have
  few output tiles (r x in), so they split K over extra programs into an fp32 buffer summed in
  fixed order afterwards: deterministic, no atomics.

Block sizes. Under the interpreter one fixed config (32 x 32 x 32, GROUP_M 4) runs: small
enough that the odd test shapes cross several tiles and exercise every mask. On a GPU the
kernel is autotuned over five configs taken from the usual Hopper/Ampere starting points
(128x128x64 / 8 warps / 3 stages and neighbours), except the rank-sized products (S', G', dA,
dB), which run one config picked by tile arithmetic (``_RANK_CONFIG``: 139 tiles of 128 x 128
for 132 SMs leave the second wave nearly empty). ``EVEN_K`` / ``EVEN_K2`` drop the K mask of a
loop whose length is a multiple of BLOCK_K (CogVideoX's 3072 and 12288 features and r = 128;
not the 17,776 tokens dA and dB reduce over).
Statically they are sound: every launch of a CogVideoX-shape step compiles for sm_90 with
wgmma, a pipelined (cp.async) K loop, no register spills and at most 144 KiB of shared memory
(bench/kernel_compile.py, a CI test; bench/results/kernel_compile_sm90_*). Their speed is not
measured on a GPU, nor is the split-K heuristic: bench/kernel_sweep.py times 16 candidates on
every launch and prints the list to put here; until it has run on the target GPU the list is
a starting point, not a tuned choice.

Layers: ``_fused_mm_kernel`` (Triton) -> ``fused_mm`` (launcher) -> ``_lora_forward`` /
``_lora_backward`` (the launch sequences of the math above), all in this module; then, in
``lora_linear_op``, the torch.library custom ops ``lora_linear_fwd`` / ``lora_linear_bwd``
(fake impls and registered autograd, so torch.compile(fullgraph=True) traces through without a
graph break) -> the public ``lora_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, UPCAST, check_device, empty, to_out_dtype

__all__ = ["fused_mm", "pick_split_k"]


# --------------------------------------------------------------------------- kernel


@triton.jit
def _accumulate(
    acc,
    a_ptr,
    b_ptr,
    rows,
    cols,
    mask_m,
    mask_n,
    k_lo,
    k_hi,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc += A[rows, k_lo:k_hi] @ B[k_lo:k_hi, cols], fp32 accumulator.

    EVEN_K: k_lo and k_hi are multiples of BLOCK_K, so every tile is whole along K and the loads
    carry only the M / N edge masks (no per-iteration K compare).
    """
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit offsets: M * stride overflows int32 at video shapes (17,776 x 12,288 x batch).
    k_start = tl.cast(k_lo, tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k[None, :]) * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k[:, None]) * stride_bk + cols[None, :] * stride_bn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = (k0 + offs_k) < k_hi
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic is wrong there (see _common)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _fused_mm_kernel(
    a1_ptr,
    b1_ptr,
    a2_ptr,
    b2_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K1,
    K2,
    stride_a1m,
    stride_a1k,
    stride_b1k,
    stride_b1n,
    stride_a2m,
    stride_a2k,
    stride_b2k,
    stride_b2n,
    stride_cs,
    stride_cm,
    stride_cn,
    alpha,
    HAS_SECOND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_K2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[split] = alpha * (A1 @ B1 + A2 @ B2) + bias; B operands are [K, N] views (any strides).

    Axis 0 walks output tiles in GROUP_M-row super-groups (consecutive programs share the
    same B1 columns, for L2 reuse); axis 1 is the split-K index (the launcher only splits
    single-product calls, so the second loop never runs split). EVEN_K / EVEN_K2: K1 / K2 is a
    multiple of BLOCK_K (set by the launcher's heuristic), so that loop has no K mask.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    # This program's share of K1, in whole BLOCK_K tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(K1, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K1, k_lo + tiles_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc, a1_ptr, b1_ptr, rows, cols, mask_m, mask_n, k_lo, k_hi,
        stride_a1m, stride_a1k, stride_b1k, stride_b1n, UPCAST, DOT_PRECISION, BLOCK_K, EVEN_K,
    )  # fmt: skip
    if HAS_SECOND:
        # The fused LoRA term: extra K iterations on the same accumulator.
        acc = _accumulate(
            acc, a2_ptr, b2_ptr, rows, cols, mask_m, mask_n, 0, K2,
            stride_a2m, stride_a2k, stride_b2k, stride_b2n, UPCAST, DOT_PRECISION, BLOCK_K, EVEN_K2,
        )  # fmt: skip
    acc = acc * alpha
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(
        c_ptrs,
        to_out_dtype(acc, c_ptr.dtype.element_ty, UPCAST),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# One fixed config under the interpreter (autotune would need a CPU timer there); on a GPU a
# small autotune set, compile-checked for sm_90 but not timed on a GPU (see the module docstring).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [
        (128, 128, 8, 3),
        (128, 256, 8, 3),
        (128, 64, 4, 4),
        (64, 128, 4, 4),
        (64, 64, 4, 4),
    ]
]
if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
else:
    _CONFIGS = _GPU_CONFIGS

# Rank-sized products: one product whose output has at most RANK_SIZED rows or columns (S' = s x A.T
# and G' = s dy B [M, r], dA [r, in], dB [out, r]) run _RANK_CONFIG alone. Chosen by tile arithmetic,
# not by a timing: 132 SMs (H100 SXM, H200), M = 17,776, r = 128, a launch lasting as long as its
# busiest SM (equal tiles, an SM's throughput shared by the tiles it holds):
#   S', G'   128 x 128: 139 tiles, 1.05 per SM, the busiest run 2: 139 / (2 x 132) = 53% of SM-time used
#            64 x 128:  278 tiles, 2.11 per SM, at most 3: 70%
#            64 x 64:   556 tiles, 4.21 per SM, at most 5: 84%
#   dA, dB   (K = 17,776, split by pick_split_k) 64 x 64: 96 tiles x 4 splits (in / out 3072) or 384 x 1
#            (12288): 384 programs, 2.91 per SM, at most 3: 97%; 128 x 128: 96 programs, 73%.
# The price of 64 x 64: each row block of x (dy) is read by two column tiles, adjacent programs under
# GROUP_M (so the second read can come from L2), and the rank-wide operand by twice as many row tiles.
RANK_SIZED = 128
_RANK_CONFIG = _GPU_CONFIGS[4]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's candidates for one launch: _RANK_CONFIG alone for a rank-sized product (when the
    list holds it), else the whole list."""
    if kwargs.get("HAS_SECOND") or min(named_args["M"], named_args["N"]) > RANK_SIZED:
        return configs
    return [c for c in configs if c == _RANK_CONFIG] or configs


def _even_k(k_arg: str):
    return lambda args: args[k_arg] % args["BLOCK_K"] == 0


_fused_mm_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["M", "N", "K1", "K2", "HAS_SECOND", "HAS_BIAS", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(triton.heuristics({"EVEN_K": _even_k("K1"), "EVEN_K2": _even_k("K2")})(_fused_mm_kernel))


# --------------------------------------------------------------------------- launcher


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; only decides whether split-K is exercised


def pick_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the reduction when the output has too few tiles to fill the machine.

    Heuristic (unmeasured): aim for about one program per SM using 128 x 128 tiles, keep at
    least 4 BLOCK_K=64 tiles (256 elements of K) per split, at most 16 splits, and only
    powers of two (SPLIT_K is a constexpr: each value is one more compiled / tuned variant).
    """
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    split = max(1, min(16, sms // tiles, k // 256))
    return 1 << (split.bit_length() - 1)


def fused_mm(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * (a1 @ b1 + a2 @ b2) + bias`` in one kernel launch (fp32 accumulation).

    a1 [M, K1], b1 [K1, N], a2 [M, K2], b2 [K2, N]: any strides (pass ``w.t()`` views, never
    copies). Output in a1's dtype, contiguous, or written into ``out`` ([M, N], any strides).
    ``split_k`` (single product only) None = heuristic.
    """
    check_device(a1, b1)
    m, k1 = a1.shape
    n = b1.shape[1]
    assert b1.shape[0] == k1, (a1.shape, b1.shape)
    has_second = a2 is not None
    if has_second:
        assert b2 is not None and a2.shape[0] == m and b2.shape == (a2.shape[1], n), (a2.shape, b2.shape)
        k2 = a2.shape[1]
    else:
        a2, b2, k2 = a1, b1, 0  # dummies, never read (HAS_SECOND=False)
    dtype = a1.dtype
    if out is None:
        out = empty((m, n), dtype=dtype, device=a1.device)
    if m == 0 or n == 0:
        return out
    if split_k is None:
        split_k = 1 if has_second else pick_split_k(m, n, k1, a1.device)
    if has_second or k1 == 0:
        split_k = 1

    if split_k > 1:
        # fp32 partials [split, M, N], summed below in a fixed order (deterministic).
        c = empty((split_k, m, n), dtype=torch.float32, device=a1.device)
        stride_cs, stride_cm, stride_cn = c.stride()
    else:
        c = out
        stride_cs, (stride_cm, stride_cn) = 0, out.stride()

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    _fused_mm_tuned[grid](
        a1, b1, a2, b2, bias if bias is not None else a1, c,
        m, n, k1, k2,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        stride_cs, stride_cm, stride_cn,
        float(alpha),
        HAS_SECOND=has_second,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        UPCAST=UPCAST,
        # fp32 operands: IEEE products, to match torch (which does not use TF32 by default).
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if split_k > 1:
        out.copy_(c.sum(dim=0))
    return out


# --------------------------------------------------------------------------- LoRA launch sequences
# Kept beside fused_mm (not with the custom ops) so they resolve fused_mm through this module's
# globals: patching lora_linear.fused_mm (tests count launches) then sees every GEMM.


def _lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    s = fused_mm(x, lora_a.t(), alpha=scale)  # S' = s x A.T   [M, r]
    y = fused_mm(x, weight.t(), s, lora_b.t(), bias=bias)  # x W.T + S' B.T + b
    return y, s


def _lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    need_x: bool,
    need_w: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, ...]:
    # Custom ops cannot return None, and their outputs may not alias each other: a fresh
    # empty tensor per output means "not computed".
    dx, dw, db, da, dbb = (dy.new_empty(0) for _ in range(5))
    if need_x or need_a:
        g = fused_mm(dy, lora_b, alpha=scale)  # G' = s dy @ B   [M, r], once
        if need_x:
            dx = fused_mm(dy, weight, g, lora_a)  # dy @ W + G' @ A
        if need_a:
            da = fused_mm(g.t(), x)  # G'.T @ x
    if need_b:
        dbb = fused_mm(dy.t(), s)  # dy.T @ S'
    if need_w:
        dw = fused_mm(dy.t(), x)
    if need_bias:
        db = dy.sum(dim=0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, da, dbb
