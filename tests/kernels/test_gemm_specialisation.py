"""The GEMM kernels' specialisations: whole-tile K loops (EVEN_* constexprs) and the rank-sized config.

Whole-tile K loops: both specialisations run and agree.

fused_mm (lora_linear's kernel) has EVEN_K (K1 % BLOCK_K == 0) and EVEN_K2 (the fused second product);
the FP8 GEMM has EVEN_K and EVEN_R (its LoRA K segment), the quantise pass EVEN_K. Each launch here
records the value its heuristic gave, so the test shows which specialisation ran; the shapes are chosen
for the interpreter's blocks (BLOCK_K 32; BLOCK_R 16). The parity suites cover the masked side at many
more shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fastcog.kernels.lora_linear import fused_mm
from fastcog.kernels.lora_linear_fp8 import E4M3, fp8_lora_mm, quantize_lora

from . import device, poisoned_allocations

lora = importlib.import_module("fastcog.kernels.lora_linear")
fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")


@pytest.fixture
def seen(monkeypatch) -> dict[str, list[bool]]:
    """{name: values} of every EVEN_* heuristic of the three kernels, as the launches compute them."""
    values: dict[str, list[bool]] = {}
    for tuned, prefix in ((lora._fused_mm_tuned, "mm"), (fp8._fp8_lora_mm_tuned, "fp8"), (fp8._quant_lora_tuned, "q")):
        for name, heuristic in dict(tuned.fn.values).items():

            def record(args, _h=heuristic, _key=f"{prefix}.{name}"):
                values.setdefault(_key, []).append(bool(_h(args)))
                return _h(args)

            monkeypatch.setitem(tuned.fn.values, name, record)
    return values


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    "k1, k2, split_k, even_k, even_k2",
    [(64, 32, 1, True, True), (96, 0, 2, True, True), (45, 20, 1, False, False), (45, 0, 2, False, True)],
    ids=["whole-tiles", "whole-tiles-split", "masked", "masked-split"],
)
def test_fused_mm_whole_tile_and_masked_k(seen, k1, k2, split_k, even_k, even_k2):
    """K1 / K2 multiples of BLOCK_K (32 here) run the unmasked loops, split-K included (96 = 2 + 1 tiles);
    odd ones the masked loops. fp32 operands, IEEE dots: equal to fp64 up to fp32 rounding."""
    g = torch.Generator().manual_seed(k1 + k2)
    dev = device()
    m, n = 37, 40
    a1, b1 = _rand(m, k1, gen=g), _rand(k1, n, gen=g)
    a2, b2 = (_rand(m, k2, gen=g), _rand(k2, n, gen=g)) if k2 else (None, None)
    truth = a1 @ b1 + (a2 @ b2 if k2 else 0)
    f32 = [t.float().to(dev) if t is not None else None for t in (a1, b1, a2, b2)]
    with poisoned_allocations():
        out = fused_mm(*f32, split_k=split_k)
    assert seen["mm.EVEN_K"] == [even_k] and seen["mm.EVEN_K2"] == [even_k2]
    torch.testing.assert_close(out.double().cpu(), truth, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k, r", [(64, 16), (48, 8)], ids=["whole-tiles", "masked"])
def test_fp8_gemm_and_quantise_whole_tile_and_masked_k(seen, k, r):
    """The FP8 GEMM's FP8 loop (EVEN_K) and LoRA segment (EVEN_R), the quantise pass's loop (EVEN_K), each
    whole-tile at K = 64, r = 16 and masked at K = 48, r = 8: the same results as torch on the same inputs."""
    g = torch.Generator().manual_seed(k)
    dev = device()
    m, n = 19, 40
    x = _rand(m, k, gen=g).to(torch.bfloat16).to(dev)
    lora_a = (_rand(k, r, gen=g) / 8).to(torch.bfloat16).to(dev)
    x8, x_inv, s = quantize_lora(x, lora_a, 0.5, E4M3, rowwise=True)
    w8 = (_rand(n, k, gen=g) * 8).to(E4M3).to(dev)
    w_inv = torch.rand(n, generator=g, dtype=torch.float32).to(dev) + 0.5
    lora_b = (_rand(r, n, gen=g) / 4).to(torch.bfloat16).to(dev)
    with poisoned_allocations():
        y = fp8_lora_mm(x8, x_inv, w8, w_inv, s, lora_b, None, fast_accum=True)
    even = k % 32 == 0
    assert seen["q.EVEN_K"] == [even] and seen["fp8.EVEN_K"] == [even] and seen["fp8.EVEN_R"] == [r % 16 == 0]
    s_truth = 0.5 * x.double() @ lora_a.double()
    torch.testing.assert_close(s.double(), s_truth, rtol=1e-2, atol=1e-2)  # stored in bf16
    base = (x8.double() @ w8.double().T) * x_inv.double() * w_inv.double()[None, :]
    truth = base + s.double() @ lora_b.double()
    torch.testing.assert_close(y.double(), truth, rtol=1e-2, atol=1e-2 * truth.abs().max().item())


def test_rank_sized_products_run_the_rank_config():
    """On a GPU the autotuner offers a single product with an output dimension <= RANK_SIZED (S', G', dA, dB)
    only _RANK_CONFIG (tile arithmetic in lora_linear); every other launch, and any list without it, is kept."""
    configs, prune, rank = lora._GPU_CONFIGS, lora._prune_configs, lora._RANK_CONFIG
    assert rank in configs and configs[0] != rank  # the general list still starts with its own first config
    for m, n in [(17776, 128), (128, 3072), (12288, 128), (7, 64)]:
        assert prune(configs, {"M": m, "N": n}, HAS_SECOND=False) == [rank], (m, n)
    for m, n, second in [(17776, 3072, True), (17776, 129, False), (17776, 128, True), (3072, 3072, False)]:
        assert prune(configs, {"M": m, "N": n}, HAS_SECOND=second) == configs, (m, n, second)
    assert prune(configs[:2], {"M": 17776, "N": 128}, HAS_SECOND=False) == configs[:2]


def test_quantise_pass_offers_the_wide_configs_to_wide_ranks_only(monkeypatch):
    """On a GPU the quantise pass's autotuner offers _QUANT_CONFIGS_WIDE (8 warps) to r > 128 (fastcog.fast.qkv's
    3 x 128, whose [64, 512] fp32 accumulator spills over 4 warps) and the other configs to r <= 128."""
    import triton

    narrow, wide = (triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=w) for w in (4, 8))
    monkeypatch.setattr(fp8, "_QUANT_CONFIGS_WIDE", [wide])
    for r, want in [(128, [narrow]), (8, [narrow]), (384, [wide]), (129, [wide])]:
        assert fp8._quant_prune([narrow, wide], {"R": r}) == want, r
    assert fp8._quant_prune([narrow], {"R": 384}) == [narrow]  # a list without one: kept whole
