"""Fused LoRA linear on a frozen FP8 base (fastcog.fast.fp8.Fp8Linear's weights), in Triton.

Math (s = LoRA scale; ``q(t), inv(t) = fastcog.fast.fp8.quantize(t, fmt, rowwise)``, t ~ q(t) * inv(t))::

    x [M, K] bf16/fp16   W [N, K] frozen, stored as q(W) [N, K] and q(W^T) [K, N] (e4m3)
    A [r, K]  B [N, r]  b [N] optional

    forward   x8, x_inv = q(x)                      e4m3; x_inv [M, 1] rowwise, [] tensorwise
              S  = s * x @ A.T                      [M, r]  saved (high-precision x, not x8)
              y  = (x8 @ q(W).T) * x_inv * w_inv + S @ B.T + b
    backward  dy8, dy_inv = q(dy)                   e4m3 rowwise, e5m2 tensorwise
              G  = s * dy @ B                       [M, r]  computed once
              dx = (dy8 @ q(W^T).T) * dy_inv * wt_inv + G @ A
              dA = G.T @ x,  dB = dy.T @ S,  db = sum_M dy (only when b requires grad); never dW

Launches. ``_quant_lora_kernel`` reads x (or dy) per row block for the row amax and S (or G), and writes
x8, x_inv and S. Rowwise, a row's scale is known only after the row, so a second loop rounds and stores
x8; tensorwise, the scale comes from a global amax taken by torch first and one loop does everything.
``_fp8_lora_mm_kernel``: FP8 x FP8 with fp32 accumulation, the two inverse scales on the accumulator, then
S @ B.T (G @ A) as extra bf16/fp16 K iterations into it, the bias, one store. dA, dB: ``lora_linear.fused_mm``.
The forward GEMM accumulates in the FP8 MMA's native (fast) precision, the dx GEMM promotes into fp32 once
per BLOCK_K, as fastcog.fast.fp8 uses ``_scaled_mm``'s fast accumulation for the forward only.

Quantisation equals ``fastcog.fast.fp8.quantize`` bit for bit: fp64 ``fmax / max(amax, 1e-12)`` rounded to
fp32; rowwise, rounded down to a power of two by keeping the fp32 exponent bits (torch's
``exp2(floor(log2(.)))``: 448 / amax of a bf16 / fp16 amax is never within fp32 rounding of a power of two
without being one); ``clamp(x * scale, -fmax, fmax)`` rounded to nearest even.

Triton interpreter (the CPU tests). FP8 loads / stores (raw bytes) and FP8 -> fp32 casts are exact, but
(triton 3.7.1) its fp32 -> FP8 cast rounds ties away from zero and drops a round-up's carry into the
exponent (7.96 -> 4.0 in e4m3), its FP8 dot zeroes e5m2 subnormals and decodes NaN / inf as finite. Under
the interpreter only (constexprs; the GPU keeps its native cast and FP8 dots) ``EXACT_CAST`` rounds by
integer arithmetic on the fp32 bits and ``EMULATE_FP8`` dots FP8 tiles as fp32 (exact products, NaN / inf kept).

Block sizes. Interpreter: one small config, so the odd test shapes cross tiles and exercise every mask.
GPU: short autotune lists (FP8 K blocks of 128: wgmma's FP8 K step is 32); ``EVEN_K`` / ``EVEN_R`` drop the
K masks of whole-tile loops (CogVideoX's K and N: 3072, 12288; r = 128). Not timed on a GPU.

Layers: kernels -> ``quantize_lora`` / ``fp8_lora_mm`` (launchers) -> ``_lora_fp8_forward`` /
``_lora_fp8_backward`` (the launch sequences); custom ops and the public function: ``lora_linear_fp8_op``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, UPCAST, check_device, empty, to_out_dtype
from .lora_linear import _accumulate, fused_mm

__all__ = ["fp8_lora_mm", "quantize_lora"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_FORMATS = {E4M3: (448.0, 3, 7), E5M2: (57344.0, 2, 15)}  # (fmax, mantissa bits, exponent bias)


@triton.jit
def _to_scale(amax, FP8_MAX: tl.constexpr, POW2: tl.constexpr):
    """fastcog.fast.fp8._amax_to_scale, fp32: fmax / max(amax, 1e-12) in fp64; POW2 rounds down to 2^k."""
    # NaN propagates, as in torch (tl.maximum's default would drop it).
    scale = (FP8_MAX / tl.maximum(amax.to(tl.float64), 1e-12, propagate_nan=tl.PropagateNan.ALL)).to(tl.float32)
    if POW2:  # the exponent bits alone: 2^floor(log2(scale)) for a normal scale; 0 (amax = inf) stays 0
        p2 = (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        scale = tl.where(scale == scale, p2, scale)
    return scale


@triton.jit
def _inverse(scale):  # 1 / scale correctly rounded to fp32 (fp64 division, then fp32: no double rounding)
    return (1.0 / scale.to(tl.float64)).to(tl.float32)


@triton.jit
def _fp8_rtne_code(v, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """fp32 v (|v| <= the format's max, or NaN) -> its FP8 code, rounded to nearest even, as int32.

    Normal range: drop 23 - MBITS mantissa bits of the fp32 pattern, round to nearest even on the
    integer (a round-up carries into the exponent, as it must), rebias the exponent. Subnormal range:
    the value in units of the smallest subnormal, rounded to nearest even; the top of that range,
    2^MBITS units, is also the code of the smallest normal, so the two ranges join.
    """
    DROP: tl.constexpr = 23 - MBITS
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    normal = ((mag + ((1 << (DROP - 1)) - 1) + ((mag >> DROP) & 1)) >> DROP) - ((127 - BIAS) << MBITS)
    is_normal = mag >= ((128 - BIAS) << 23)  # |v| >= 2^(1 - BIAS)
    units = tl.where(is_normal | (mag > 0x7F800000), 0.0, tl.abs(v)) * ((1 << (BIAS - 1 + MBITS)) * 1.0)
    whole = units.to(tl.int32)  # units >= 0: truncation is floor
    frac = units - whole.to(tl.float32)
    sub = whole + ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))).to(tl.int32)
    code = tl.where(is_normal, normal, sub)
    code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN: 0x7F with the sign, as torch
    return code | ((bits >> 24) & 0x80)


@triton.jit
def _quantize_store(q_ptr, q_ptrs, xf, scale, mask, FP8_MAX: tl.constexpr, MBITS: tl.constexpr,
                    BIAS: tl.constexpr, EXACT_CAST: tl.constexpr):  # fmt: skip
    """Store sat(xf * scale) in q_ptr's FP8 format (as quantize: clamp, then round to nearest even)."""
    v = tl.clamp(xf * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_CAST:  # interpreter: its own cast mis-rounds (module docstring)
        q = _fp8_rtne_code(v, MBITS, BIAS).to(tl.uint8).to(q_ptr.dtype.element_ty, bitcast=True)
    else:
        q = v.to(q_ptr.dtype.element_ty)
    tl.store(q_ptrs, q, mask=mask)


@triton.jit
def _fp8_tile_to_f32(t):
    """An FP8 tile -> fp32, exactly (interpreter): its cast is exact for finite codes; NaN / inf restored."""
    v = t.to(tl.float32)
    code = t.to(tl.uint8, bitcast=True) & 0x7F
    if t.dtype == tl.float8e4nv:
        v = tl.where(code == 0x7F, float("nan"), v)
    else:  # e5m2: 0x7C is inf, above it NaN
        inf = tl.where(v < 0, float("-inf"), float("inf"))
        v = tl.where(code > 0x7C, float("nan"), tl.where(code == 0x7C, inf, v))
    return v


# --------------------------------------------------------------------------- kernels


@triton.jit
def _quant_lora_kernel(
    x_ptr, l_ptr, amax_ptr, q_ptr, inv_ptr, s_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_lk, stride_lr,
    lora_scale,
    ROWWISE: tl.constexpr, FP8_MAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
    EXACT_CAST: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """q = sat(x * scale) [M, K] (contiguous), inv = 1 / scale, s = lora_scale * x @ L  ([K, R] view L)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    l_ptrs = l_ptr + offs_k[:, None] * stride_lk + offs_r[None, :] * stride_lr
    q_ptrs = q_ptr + rows[:, None] * K + offs_k[None, :]
    if ROWWISE:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        nan = tl.zeros((BLOCK_M,), dtype=tl.float32)  # stays 0, or NaN once the row has a NaN
    else:
        scale = _to_scale(tl.load(amax_ptr).to(tl.float32), FP8_MAX, False)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            mask_x = mask_m[:, None]
            mask_l = mask_r[None, :]
        else:
            mask_k = (k0 + offs_k) < K
            mask_x = mask_m[:, None] & mask_k[None, :]
            mask_l = mask_k[:, None] & mask_r[None, :]
        x = tl.load(x_ptrs, mask=mask_x, other=0.0)
        xf = x.to(tl.float32)
        if ROWWISE:
            ax = tl.abs(xf)
            # tl.max skips NaN (maxnum on a GPU, nanmax interpreted): NaNs are counted apart, as NaN.
            amax = tl.maximum(amax, tl.max(ax, axis=1))
            nan = nan + tl.sum(tl.where(ax == ax, 0.0, ax), axis=1)
        else:
            _quantize_store(q_ptr, q_ptrs, xf, scale, mask_x, FP8_MAX, MBITS, BIAS, EXACT_CAST)
        lt = tl.load(l_ptrs, mask=mask_l, other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic is wrong there (see _common)
            acc = tl.dot(xf, lt.to(tl.float32), acc)
        else:
            acc = tl.dot(x, lt, acc)
        x_ptrs += BLOCK_K * stride_xk
        l_ptrs += BLOCK_K * stride_lk
        q_ptrs += BLOCK_K

    s_ptrs = s_ptr + rows[:, None] * R + offs_r[None, :]
    s = to_out_dtype(acc * lora_scale, s_ptr.dtype.element_ty, UPCAST)
    tl.store(s_ptrs, s, mask=mask_m[:, None] & mask_r[None, :])

    if ROWWISE:
        scale = _to_scale(amax + nan, FP8_MAX, True)
        tl.store(inv_ptr + rows, _inverse(scale), mask=mask_m)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        q_ptrs = q_ptr + rows[:, None] * K + offs_k[None, :]
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                mask_x = mask_m[:, None]
            else:
                mask_x = mask_m[:, None] & ((k0 + offs_k) < K)[None, :]
            xf = tl.load(x_ptrs, mask=mask_x, other=0.0).to(tl.float32)
            _quantize_store(q_ptr, q_ptrs, xf, scale[:, None], mask_x, FP8_MAX, MBITS, BIAS, EXACT_CAST)
            x_ptrs += BLOCK_K * stride_xk
            q_ptrs += BLOCK_K
    else:
        tl.store(inv_ptr, _inverse(scale), mask=pid == 0)


@triton.jit
def _fp8_lora_mm_kernel(
    a_ptr, b_ptr, a_inv_ptr, b_inv_ptr, s_ptr, l_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bn, stride_bk, stride_ai, stride_bi,
    stride_sm, stride_sr, stride_lr, stride_ln, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, FAST_ACCUM: tl.constexpr, EMULATE_FP8: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C = (A8 @ B8.T) * a_inv[row] * b_inv[col] + S @ L + bias; A8 [M, K], B8 [N, K] FP8, L [R, N].

    Inverse-scale strides are 0 for one scale per tensor. Output tiles in GROUP_M-row super-groups
    (consecutive programs share B8 columns, for L2 reuse), as lora_linear's kernel.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge wrap around (their results are never stored): no M / N load masks.
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N).to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            mask_k = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        if EMULATE_FP8:  # interpreter (module docstring)
            acc = tl.dot(_fp8_tile_to_f32(a), _fp8_tile_to_f32(b), acc, input_precision="ieee")
        elif FAST_ACCUM:  # sm_90's default for FP8: never promote the MMA's partial sums
            acc = tl.dot(a, b, acc)
        else:  # promote into the fp32 accumulator once per BLOCK_K
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    a_inv = tl.load(a_inv_ptr + rows * stride_ai, mask=mask_m, other=0.0)  # edge lanes: 0, never inf
    b_inv = tl.load(b_inv_ptr + cols * stride_bi, mask=mask_n, other=0.0)
    acc = acc * a_inv[:, None] * b_inv[None, :]
    # The LoRA term: rank-wide K iterations on the same accumulator, now in real units.
    acc = _accumulate(
        acc, s_ptr, l_ptr, rows, cols, mask_m, mask_n, 0, R,
        stride_sm, stride_sr, stride_lr, stride_ln, UPCAST, "ieee", BLOCK_R, EVEN_R,
    )  # fmt: skip
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, to_out_dtype(acc, c_ptr.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_n[None, :])


def _even_k(args: dict) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


# One fixed config per kernel under the interpreter; on a GPU short autotune lists, compile-checked
# for sm_90 (no spills, within shared memory) but not timed on a GPU.
if INTERPRET:
    _QUANT_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]
    _MM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 4})]
    _QUANT_CONFIGS_WIDE: list = []
else:
    # 64-row blocks, by arithmetic (not a timing): M = 17,776 gives 278 programs for 132 SMs, at most 3 per SM
    # for a mean of 2.11 (70% of SM-time; 128 rows: 139, at most 2 for 1.05: 53%; under 64 rows, no wgmma).
    _QUANT_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_K": bk}, num_warps=4, num_stages=3) for bk in (128, 64)]
    # r > 128 (fastcog.fast.qkv's 3 x 128): 8 warps hold the [64, 512] fp32 accumulator (it spills over 4); K blocks
    # of 32 / 64 keep the [BLOCK_K, 512] tiles within shared memory.
    _QUANT_CONFIGS_WIDE = [triton.Config({"BLOCK_M": 64, "BLOCK_K": bk}, num_warps=8, num_stages=st)
                           for bk, st in [(32, 3), (64, 2)]]  # fmt: skip
    _MM_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "BLOCK_R": 64, "GROUP_M": 8},
                      num_warps=w, num_stages=st)  # fmt: skip
        for bm, bn, w, st in [(128, 128, 8, 4), (256, 128, 8, 3), (64, 128, 4, 4)]
    ]


def _quant_prune(configs: list, named_args: dict, **kwargs) -> list:  # _QUANT_CONFIGS_WIDE for r > 128
    return [c for c in configs if (c in _QUANT_CONFIGS_WIDE) == (named_args["R"] > 128)] or configs


_quant_lora_tuned = triton.autotune(
    configs=_QUANT_CONFIGS + _QUANT_CONFIGS_WIDE, key=["M", "K", "R", "ROWWISE", "FP8_MAX"],
    prune_configs_by={"early_config_prune": _quant_prune},
)(triton.heuristics({"EVEN_K": _even_k})(_quant_lora_kernel))
_fp8_lora_mm_tuned = triton.autotune(configs=_MM_CONFIGS, key=["M", "N", "K", "R", "HAS_BIAS", "FAST_ACCUM"])(
    triton.heuristics({"EVEN_K": _even_k, "EVEN_R": lambda args: args["R"] % args["BLOCK_R"] == 0})(_fp8_lora_mm_kernel)
)


# --------------------------------------------------------------------------- launchers


def quantize_lora(
    x: torch.Tensor, lora: torch.Tensor, lora_scale: float, fp8_dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch over x [M, K] (any strides): ``(q, inv, s)``.

    q [M, K] contiguous in fp8_dtype and inv (fp32, [M, 1] rowwise, [] tensorwise) are exactly
    ``fastcog.fast.fp8.quantize(x, fp8_dtype, rowwise)``; s = lora_scale * x @ lora [M, R] in x's dtype,
    lora a [K, R] view with any strides (``A.t()`` for S, ``B`` for G).
    """
    check_device(x, lora)
    m, k = x.shape
    r = lora.shape[1]
    assert lora.shape[0] == k, (x.shape, lora.shape)
    fmax, mbits, bias = _FORMATS[fp8_dtype]
    q = empty((m, k), fp8_dtype, x.device)
    inv = empty((m, 1) if rowwise else (), torch.float32, x.device)
    s = empty((m, r), x.dtype, x.device)
    if m == 0:
        return q, inv.fill_(1.0), s
    # Tensorwise needs the global amax before any element is rounded: one torch reduction (NaN-propagating).
    amax = x if rowwise else torch.linalg.vector_norm(x, float("inf"))
    _quant_lora_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x, lora, amax, q, inv, s,
        m, k, r,
        x.stride(0), x.stride(1), lora.stride(0), lora.stride(1),
        float(lora_scale),
        ROWWISE=rowwise, FP8_MAX=fmax, MBITS=mbits, BIAS=bias,
        EXACT_CAST=INTERPRET, UPCAST=UPCAST, BLOCK_R=max(16, triton.next_power_of_2(r)),
    )  # fmt: skip
    return q, inv, s


def fp8_lora_mm(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor, s: torch.Tensor,
                lora: torch.Tensor, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:  # fmt: skip
    """``(a8 @ b8.T) * a_inv * b_inv + s @ lora + bias`` in one launch, output [M, N] in s's dtype.

    a8 [M, K] and b8 [N, K] FP8 with K contiguous (the K-major operands FP8 MMAs take: x8 / dy8 and
    Fp8Linear's weight copies); a_inv [] or [M, 1], b_inv [] or [1, N] fp32; s [M, R]; lora [R, N] view,
    any strides; bias [N] or None.
    """
    check_device(a8, b8, s, lora)
    (m, k), n, r = a8.shape, b8.shape[0], s.shape[1]
    assert b8.shape[1] == k and lora.shape == (r, n) and s.shape[0] == m, (a8.shape, b8.shape, s.shape, lora.shape)
    a_inv, b_inv = a_inv.reshape(-1), b_inv.reshape(-1)
    assert a_inv.numel() in (1, m) and b_inv.numel() in (1, n), (a_inv.shape, b_inv.shape)
    out = empty((m, n), s.dtype, a8.device)
    if m == 0 or n == 0:
        return out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _fp8_lora_mm_tuned[grid](
        a8, b8, a_inv, b_inv, s, lora, bias if bias is not None else s, out,
        m, n, k, r,
        a8.stride(0), a8.stride(1), b8.stride(0), b8.stride(1),
        0 if a_inv.numel() == 1 else a_inv.stride(0), 0 if b_inv.numel() == 1 else b_inv.stride(0),
        s.stride(0), s.stride(1), lora.stride(0), lora.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, FAST_ACCUM=fast_accum, EMULATE_FP8=INTERPRET, UPCAST=UPCAST,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- launch sequences
# Beside the launchers (not with the custom ops) so that they resolve the launchers and fused_mm
# through this module's globals: a test patching them here sees every launch.


def _lora_fp8_forward(x, weight_fp8, weight_inv_scale, bias, lora_a, lora_b, scale: float, rowwise: bool):
    """(y, S): the forward of the module docstring, two launches."""
    x8, x_inv, s = quantize_lora(x, lora_a.t(), scale, E4M3, rowwise)  # x8, x_inv, S = s x A.T
    y = fp8_lora_mm(x8, x_inv, weight_fp8, weight_inv_scale, s, lora_b.t(), bias, fast_accum=True)
    return y, s


def _lora_fp8_backward(dy, x, weight_t_fp8, weight_t_inv_scale, lora_a, lora_b, s, scale: float, rowwise: bool,
                       need_x: bool, need_bias: bool, need_a: bool, need_b: bool):  # fmt: skip
    """(dx, db, dA, dB), each only when asked for: the backward of the module docstring."""
    # Custom ops cannot return None, and their outputs may not alias: an empty tensor means "not computed".
    dx, db, da, dbb = (dy.new_empty(0) for _ in range(4))
    if need_x:
        dy8, dy_inv, g = quantize_lora(dy, lora_b, scale, E4M3 if rowwise else E5M2, rowwise)  # G = s dy B
        dx = fp8_lora_mm(dy8, dy_inv, weight_t_fp8, weight_t_inv_scale, g, lora_a, None, fast_accum=False)
    elif need_a:
        g = fused_mm(dy, lora_b, alpha=scale)
    if need_a:
        da = fused_mm(g.t(), x)  # G.T @ x
    if need_b:
        dbb = fused_mm(dy.t(), s)  # dy.T @ S
    if need_bias:
        db = dy.sum(dim=0, dtype=torch.float32).to(dy.dtype)
    return dx, db, da, dbb
