"""FP8 frozen linears (fastcog.fast.fp8): numerics, no weight-gradient work, conversion, compile.

Parity is by SQNR = 20 log10(||ref|| / ||out - ref||) against an fp64 product of the same bf16
inputs. What to expect: rounding to a format with m mantissa bits leaves a relative error that
is uniform over half a step, rms about 2^-m / sqrt(12) / 1.4 (values are spread over the binade):
e4m3 (m = 3) ~ 0.026 -> 31.7 dB per quantised operand, e5m2 (m = 2) ~ 25.7 dB. Independent
errors of two operands add in power, and a dot product keeps the relative error of its terms:

    one operand e4m3 (storage: W only)                ~31.7 dB   measured 32.4 - 33.1
    x and W e4m3 (forward; rowwise dx)                ~28.7 dB   measured 27.5 - 29.5
    dy e5m2, W e4m3 (tensorwise dx)                   ~24.7 dB   measured 23.9 - 25.3

(5 seeds x the shapes below; plain bf16 F.linear measures ~55.5 dB.) Thresholds sit 2-3 dB below
the worst measurement; the mutation test shows that a wrong scale or a wrong transpose lands far
below them (near 0 dB), so they cannot pass a broken kernel. Beyond SQNR, both recipes are checked
bit for bit against torchao.float8 (same recipe, the same casts and the same _scaled_mm calls).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastcog.fast.fp8 import (
    E4M3,
    E5M2,
    Fp8Linear,
    Fp8StorageLinear,
    convert_linears_to_fp8,
    convert_linears_to_fp8_storage,
    fp8_storage_linear,
    quantize,
)
from tests.runs import tiny_lora_transformer

RECIPES = ("tensorwise", "rowwise")
SHAPES = [(1, 256), (7, 256), (131, 256), (2, 7, 256)]
K, N = 256, 192
# dB; see the module docstring for the derivation and the measurements.
FWD_DB = 25.0
DX_DB = {"tensorwise": 22.0, "rowwise": 26.0}
STORAGE_DB = 30.0
aten = torch.ops.aten


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """NaN when out has a NaN (so `> threshold` fails), inf when exact."""
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (out - ref).norm()))


def frozen_linear(in_f: int, out_f: int, seed: int, bias: bool = True) -> nn.Linear:
    """bf16 weights whose rows differ in magnitude by ~e^+-1 (so per-row scales matter and mix-ups show)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05 * torch.exp(torch.randn(out_f, 1, generator=g)))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin.requires_grad_(False)


def activations(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16, never zero, token (row) magnitudes spread by ~e^+-1 as in real activations."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    return x.to(torch.bfloat16)


def run(module: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dx, dy) for a random dy; x is not modified."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2000)).to(y.device, y.dtype)
    y.backward(dy)
    return y.detach(), x.grad, dy


def reference(lin: nn.Linear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = lin.weight.double()
    y = x.double() @ w.T + (lin.bias.double() if lin.bias is not None else 0)
    return y, dy.double() @ w


class OpLog(TorchDispatchMode):
    """Every aten op that runs, with its args and output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple, dict, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out

    def ops(self, func) -> list[tuple[tuple, dict, object]]:
        return [(a, k, o) for f, a, k, o in self.calls if f is func]

    def output_shapes(self) -> set[tuple[int, ...]]:
        """Shapes of the tensors computed (views such as W^T.t() are not new tensors)."""
        shapes = set()
        for func, _, _, out in self.calls:
            if func.is_view:
                continue
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.add(tuple(t.shape))
        return shapes


# --------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("fp8_dtype, mantissa_bits", [(E4M3, 3), (E5M2, 2)])
@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_uses_the_range_and_rounds_to_half_a_step(fp8_dtype, mantissa_bits, rowwise):
    t = activations((37, 64), seed=3).float()
    q, inv = quantize(t.t(), fp8_dtype, rowwise)  # a transposed (column-major) input
    fmax = torch.finfo(fp8_dtype).max
    assert q.dtype == fp8_dtype and q.shape == (64, 37) and q.is_contiguous()
    assert inv.dtype == torch.float32 and inv.shape == ((64, 1) if rowwise else ())
    row_max = q.float().abs().amax(dim=1)
    if rowwise:
        # power-of-two scales: every row's largest element lands in [fmax / 2, fmax] (rounding can reach fmax / 2)
        assert torch.equal(inv, torch.exp2(torch.round(torch.log2(inv))))
        assert bool((row_max >= fmax / 2).all()) and bool((row_max <= fmax).all())
    else:
        assert float(row_max.max()) == fmax
    back = q.float() * inv
    normal = t.t().abs() >= torch.finfo(fp8_dtype).smallest_normal * inv  # subnormals: absolute error
    rel = ((back - t.t()).abs() / t.t().abs())[normal]
    assert float(rel.max()) <= 2.0 ** -(mantissa_bits + 1)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_and_dx_sqnr_against_fp64(recipe, shape):
    lin = frozen_linear(K, N, seed=1)
    x = activations(shape, seed=2)
    y, dx, dy = run(Fp8Linear(lin, recipe), x)
    y_ref, dx_ref = reference(lin, x, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and y.shape == (*shape[:-1], N) and dx.shape == shape
    assert sqnr_db(y_ref, y) > FWD_DB
    assert sqnr_db(dx_ref, dx) > DX_DB[recipe]


@pytest.mark.parametrize("recipe", RECIPES)
def test_bitwise_equal_to_torchao_float8(recipe):
    """Same recipe as torchao.float8's Float8Linear (forward and dx), without its weight-gradient GEMM."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    lin = frozen_linear(K, N, seed=4)
    theirs = nn.Sequential(copy.deepcopy(lin).requires_grad_(True))
    convert_to_float8_training(theirs, config=Float8LinearConfig.from_recipe_name(recipe))
    x = activations((2, 7, K), seed=5)
    y, dx, dy = run(Fp8Linear(lin, recipe), x)
    x2 = x.clone().requires_grad_()
    y2 = theirs(x2)
    y2.backward(dy)
    assert torch.equal(y, y2.detach())
    assert torch.equal(dx, x2.grad)


def test_non_contiguous_input_gives_the_same_result():
    lin = frozen_linear(K, N, seed=6)
    m = Fp8Linear(lin, "rowwise")
    x = activations((7, 2, K), seed=7)
    y, dx, _ = run(m, x.transpose(0, 1).contiguous())
    y_nc, dx_nc, _ = run(m, x.transpose(0, 1))
    assert torch.equal(y, y_nc) and torch.equal(dx, dx_nc)


@pytest.mark.parametrize("recipe", RECIPES)
def test_mutations_fall_below_the_thresholds(recipe):
    """A wrong scale or transpose must fail the SQNR thresholds by a wide margin."""
    lin, sq = frozen_linear(K, N, seed=8), frozen_linear(128, 128, seed=9)
    x, x_sq = activations((131, K), seed=10), activations((131, 128), seed=11)

    def fwd_db(m: nn.Module) -> float:
        y, _, dy = run(m, x)
        return sqnr_db(reference(lin, x, dy)[0], y)

    def dx_db(m: nn.Module) -> float:
        _, dx, dy = run(m, x_sq)
        return sqnr_db(reference(sq, x_sq, dy)[1], dx)

    assert fwd_db(Fp8Linear(lin, recipe)) > FWD_DB and dx_db(Fp8Linear(sq, recipe)) > DX_DB[recipe]

    doubled = Fp8Linear(lin, recipe)
    doubled.weight_inv_scale.mul_(2)  # scale off by 2x, not compensated
    untransposed = Fp8Linear(sq, recipe)
    untransposed.weight_t_fp8.copy_(untransposed.weight_fp8)  # backward multiplies by W.T instead of W
    assert fwd_db(doubled) < 5
    assert dx_db(untransposed) < 5
    if recipe == "rowwise":  # each row's scale applied to its neighbour
        rolled = Fp8Linear(lin, recipe)
        rolled.weight_inv_scale.copy_(rolled.weight_inv_scale.roll(1, dims=1))
        rolled_t = Fp8Linear(sq, recipe)
        rolled_t.weight_t_inv_scale.copy_(rolled_t.weight_t_inv_scale.roll(1, dims=1))
        assert fwd_db(rolled) < 10
        assert dx_db(rolled_t) < 10


# --------------------------------------------------------------------------- no weight-gradient work


@pytest.mark.parametrize("recipe", RECIPES)
def test_backward_is_one_fp8_gemm_for_dx_and_nothing_weight_shaped(recipe):
    m = Fp8Linear(frozen_linear(K, N, seed=12), recipe)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == []
    assert "weight" not in dict(m.named_parameters())  # the high-precision weight is gone
    x = activations((2, 7, K), seed=13).requires_grad_()
    with OpLog() as fwd:
        y = m(x)
    with OpLog() as bwd:
        y.backward(torch.ones_like(y))
    assert len(fwd.ops(aten._scaled_mm.default)) == 1
    assert len(bwd.ops(aten._scaled_mm.default)) == 1
    shapes = bwd.output_shapes()
    assert (N, K) not in shapes and (K, N) not in shapes  # no dW
    assert (N,) not in shapes  # no db for a frozen bias
    for func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.sum.dim_IntList):
        assert bwd.ops(func) == [], func


def test_bias_gradient_only_when_the_bias_requires_it():
    lin = frozen_linear(K, N, seed=14)
    lin.bias.requires_grad_(True)
    m = Fp8Linear(lin, "rowwise")
    assert m.bias is lin.bias  # same Parameter: name, flag and optimizer reference unchanged
    _, _, dy = run(m, activations((2, 7, K), seed=15))
    expected = dy.float().sum(dim=(0, 1))
    torch.testing.assert_close(lin.bias.grad.float(), expected, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_saves_only_its_fp8_weight_for_backward(recipe):
    m = Fp8Linear(frozen_linear(K, N, seed=16), recipe)
    saved: list[torch.Tensor] = []
    x = activations((131, K), seed=17).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs == {m.weight_t_fp8.data_ptr(), m.weight_t_inv_scale.data_ptr()}


# --------------------------------------------------------------------------- GPU contract, dtypes, NaN


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m_rows", [1, 7, 131])
def test_scaled_mm_calls_meet_the_cuda_requirements(recipe, m_rows):
    """CPU _scaled_mm accepts anything; CUDA wants row-major a, column-major b, K and N % 16, fp32
    scales [] or [M, 1] / [1, N] contiguous, e4m3 x e4m3 (rowwise) / e5m2 x e4m3 (tensorwise dx)."""
    m = Fp8Linear(frozen_linear(K, N, seed=18), recipe)
    x = activations((m_rows, K), seed=19).requires_grad_()
    with OpLog() as log:
        m(x).sum().backward()
    calls = log.ops(aten._scaled_mm.default)
    assert len(calls) == 2
    grad_fp8 = E4M3 if recipe == "rowwise" else E5M2
    for (args, _, out), (a_dtype, k, n) in zip(calls, [(E4M3, K, N), (grad_fp8, N, K)]):
        a, b, scale_a, scale_b = args[:4]
        assert (a.dtype, b.dtype) == (a_dtype, E4M3)
        assert a.shape == (m_rows, k) and b.shape == (k, n) and k % 16 == 0 and n % 16 == 0
        assert a.stride() == (k, 1) and b.stride() == (1, k)
        assert scale_a.dtype == scale_b.dtype == torch.float32
        if recipe == "rowwise":
            assert scale_a.shape == (m_rows, 1) and scale_b.shape == (1, n)
            assert scale_a.is_contiguous() and scale_b.is_contiguous()
            assert out.dtype == torch.bfloat16
        else:
            assert scale_a.shape == () and scale_b.shape == ()


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp16_model(recipe):
    lin = frozen_linear(K, N, seed=20).half()
    x = activations((7, K), seed=21).half()
    y, dx, dy = run(Fp8Linear(lin, recipe), x)
    y_ref, dx_ref = reference(lin, x, dy)
    assert y.dtype == dx.dtype == torch.float16
    assert sqnr_db(y_ref, y) > FWD_DB and sqnr_db(dx_ref, dx) > DX_DB[recipe]


@pytest.mark.parametrize("make", [lambda lin: Fp8Linear(lin, "rowwise"), Fp8StorageLinear], ids=["fp8", "storage"])
def test_dtype_follows_autocast_else_the_input(make):
    m = make(frozen_linear(K, N, seed=22))
    x32 = activations((7, K), seed=23).float()
    y_bf16 = m(x32.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = m(x32)  # fp32 input (e.g. a first layer) under bf16 autocast
    assert y_auto.dtype == torch.bfloat16 and torch.equal(y_auto, y_bf16)
    y32 = m(x32)  # no autocast: computed in the weight's dtype, returned in x's, as nn.Linear would
    assert y32.dtype == torch.float32 and torch.equal(y32, y_bf16.float())
    x32.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x32).float().sum().backward()
    assert x32.grad.dtype == torch.float32 and bool(torch.isfinite(x32.grad).all())


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_and_inf_are_never_silenced(recipe):
    m = Fp8Linear(frozen_linear(K, N, seed=24), recipe)
    x = activations((7, K), seed=25)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 5] = bad
        xb.requires_grad_()
        y = m(xb)
        # tensorwise: one scale, so the whole output; rowwise: the row of the bad token
        poisoned = y.isnan() if recipe == "tensorwise" else y[3].isnan()
        assert bool(poisoned.all())
        if recipe == "rowwise":
            assert bool(torch.isfinite(y[torch.arange(7) != 3]).all())
        dy = torch.ones_like(y)
        dy[2, 0] = bad
        x_ok = x.clone().requires_grad_()
        m(x_ok).backward(dy)
        assert bool(x_ok.grad[2].isnan().all())
    lin = frozen_linear(K, N, seed=26)
    lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        Fp8Linear(lin, recipe)
    with pytest.raises(ValueError, match="NaN or inf"):
        Fp8StorageLinear(lin)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="recipe"):
        Fp8Linear(frozen_linear(K, N, seed=27), "blockwise")
    with pytest.raises(ValueError, match="recipe"):
        convert_linears_to_fp8(nn.Sequential(), "none", 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(frozen_linear(K, 40, seed=28))
    with pytest.raises(ValueError, match="frozen"):
        Fp8Linear(nn.Linear(K, N))
    with pytest.raises(ValueError, match="frozen"):
        Fp8StorageLinear(nn.Linear(K, N))


# --------------------------------------------------------------------------- compile


def _block(make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64, dtype=torch.bfloat16)
            self.q = make(frozen_linear(64, 64, seed=30))
            self.k = make(frozen_linear(64, 64, seed=31))
            self.up = make(frozen_linear(64, 128, seed=32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(x)
            return self.q(h) * self.k(h) + self.up(h)[..., :64]

    return Block()


MAKERS = {
    "tensorwise": lambda lin: Fp8Linear(lin, "tensorwise"),
    "rowwise": lambda lin: Fp8Linear(lin, "rowwise"),
    "storage": Fp8StorageLinear,
}


@pytest.mark.parametrize("kind", MAKERS)
def test_compile_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    block = _block(MAKERS[kind])
    x = activations((2, 7, 64), seed=33).requires_grad_()
    assert torch._dynamo.explain(block)(x).graph_break_count == 0
    # aot_eager: dynamo + AOTAutograd (forward and backward traced through fake tensors), no codegen.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, dx, _ = run(block, x)
    y_c, dx_c, _ = run(compiled, x)
    assert torch.equal(y, y_c) and torch.equal(dx, dx_c)


@pytest.mark.parametrize("kind", ["tensorwise", "rowwise"])
def test_autocast_changes_nothing_eager_or_compiled(kind):
    """Eager autocast would cast _scaled_mm's fp32 scales to bf16 (a wrong output scale under
    tensorwise, up to 0.4%); the GEMM runs with autocast off, so y and dx under autocast, eager or
    compiled, equal the same bf16 computation without autocast, bit for bit."""
    torch._dynamo.reset()
    lin = Fp8Linear(frozen_linear(64, 64, seed=40), kind)
    x = activations((2, 7, 64), seed=41)
    y, dx, _ = run(lin, x)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    for module in (lin, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac, dx_ac, _ = run(module, x)
        assert torch.equal(y_ac, y) and torch.equal(dx_ac, dx)


@pytest.mark.slow
def test_inductor_matches_eager():
    """Inductor rounds the bf16 LayerNorm differently from eager, hence SQNR and not equality."""
    torch._dynamo.reset()
    block = _block(MAKERS["rowwise"])
    x = activations((2, 7, 64), seed=34)
    y, dx, _ = run(block, x)
    y_c, dx_c, _ = run(torch.compile(block, fullgraph=True), x)
    assert sqnr_db(y, y_c) > 30 and sqnr_db(dx, dx_c) > 30


def test_compiled_qkv_share_one_activation_quantisation_and_save_no_activation():
    """The reason Fp8Linear is an autograd.Function of aten ops: with inductor's partitioner, linears
    reading the same x quantise it once, and nothing activation-sized is kept for backward."""
    from functorch.compile import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lins = nn.ModuleList(Fp8Linear(frozen_linear(64, 48, seed=35 + i), "rowwise") for i in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(lin(x) for lin in self.lins)

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fwd"), bw_compiler=keep("bwd"),
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    x = activations((14, 64), seed=38).requires_grad_()
    torch.compile(QKV(), backend=backend, fullgraph=True)(x).sum().backward()
    fwd_targets = [n.target for n in graphs["fwd"].graph.nodes if n.op == "call_function"]
    assert fwd_targets.count(aten._scaled_mm.default) == 3
    assert fwd_targets.count(aten.amax.default) == 1
    (outputs,) = [n.args[0] for n in graphs["fwd"].graph.nodes if n.op == "output"]
    assert not any(tuple(o.meta["val"].shape) == (14, 64) for o in outputs[1:])


def test_activation_checkpointing_recomputes_the_same():
    from torch.utils.checkpoint import checkpoint

    block = _block(MAKERS["tensorwise"])
    x = activations((2, 7, 64), seed=39)
    y, dx, dy = run(block, x)
    x_ac = x.clone().requires_grad_()
    y_ac = checkpoint(block, x_ac, use_reentrant=False)
    y_ac.backward(dy)
    assert torch.equal(y, y_ac.detach()) and torch.equal(dx, x_ac.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("recipe", RECIPES)
def test_cuda_real_shapes(recipe, dtype):
    """Tier 2: the real _scaled_mm kernels (cuBLAS / CUTLASS) accept the calls and keep the SQNR at
    the 5B shapes (17,777 tokens: 49x480x720 video plus text, one over to keep M odd), eager and compiled."""
    m_rows = 17_777
    for k, n in [(3072, 3072), (3072, 12288), (12288, 3072)]:
        lin = frozen_linear(k, n, seed=60).to("cuda", dtype)
        x = activations((m_rows, k), seed=61).to("cuda", dtype)
        m = Fp8Linear(lin, recipe)
        y, dx, dy = run(m, x)
        y_ref, dx_ref = reference(lin, x, dy)
        assert y.dtype == dx.dtype == dtype
        assert sqnr_db(y_ref, y) > FWD_DB and sqnr_db(dx_ref, dx) > DX_DB[recipe], (k, n)
        torch._dynamo.reset()
        y_c, dx_c, _ = run(torch.compile(m, fullgraph=True), x)
        assert sqnr_db(y_ref, y_c) > FWD_DB and sqnr_db(dx_ref, dx_c) > DX_DB[recipe], (k, n)


# --------------------------------------------------------------------------- storage variant


def test_storage_sqnr_and_half_the_bytes():
    lin = frozen_linear(K, N, seed=40)
    bf16_bytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    m = Fp8StorageLinear(lin)
    fp8_bytes = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    weight_bytes = K * N * 2
    assert fp8_bytes <= bf16_bytes - weight_bytes / 2 + N * 4  # half the weight, plus a fp32 scale per row
    for shape in SHAPES:
        x = activations(shape, seed=41)
        y, dx, dy = run(m, x)
        y_ref, dx_ref = reference(lin, x, dy)
        assert y.dtype == dx.dtype == torch.bfloat16
        assert sqnr_db(y_ref, y) > STORAGE_DB and sqnr_db(dx_ref, dx) > STORAGE_DB


def test_fp8_linear_weight_bytes_equal_one_bf16_copy():
    lin = frozen_linear(K, N, seed=42)
    m = Fp8Linear(lin, "rowwise")
    assert m.weight_fp8.nbytes + m.weight_t_fp8.nbytes == lin.weight.nbytes
    assert m.weight_inv_scale.numel() + m.weight_t_inv_scale.numel() == N + K


def test_storage_saves_no_widened_weight_and_no_weight_gradient():
    lin = frozen_linear(K, N, seed=43)
    m = Fp8StorageLinear(lin)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    x = activations((131, K), seed=44).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        y = m(x)
    assert ((N, K), torch.bfloat16) not in saved and ((K, N), torch.bfloat16) not in saved
    assert ((N, K), E4M3) in saved
    with OpLog() as bwd:
        y.backward(torch.ones_like(y))
    shapes = bwd.output_shapes()
    assert (N,) not in shapes and (K, N) not in shapes  # no db, no dW (dx's widened weight is [N, K])


def test_storage_custom_op_passes_opcheck():
    lin = frozen_linear(64, 48, seed=45)
    m = Fp8StorageLinear(lin)
    x = activations((2, 7, 64), seed=46).requires_grad_()
    # test_schema is left out: its mutation check calls allclose, which CPU torch lacks for float8.
    torch.library.opcheck(fp8_storage_linear, (x, m.weight_fp8, m.weight_inv_scale),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


# --------------------------------------------------------------------------- conversion


def test_convert_picks_frozen_aligned_large_plain_linears():
    def lin(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, dtype=torch.bfloat16).requires_grad_(False)

    class Sub(nn.Linear):
        pass

    shared = lin(64, 64)
    model = nn.ModuleDict({
        "big": lin(64, 128),
        "small": lin(64, 16),  # below min_features
        "odd": lin(64, 72),  # >= min_features, not a multiple of 16
        "trainable": nn.Linear(64, 64, dtype=torch.bfloat16),
        "subclass": Sub(64, 64, dtype=torch.bfloat16).requires_grad_(False),
        "a": nn.Sequential(shared),
        "b": nn.Sequential(shared),  # the same module under a second name
    })
    names = convert_linears_to_fp8(model, "tensorwise", min_features=32)
    assert names == ["big", "a.0", "b.0"]
    assert isinstance(model["big"], Fp8Linear) and model["a"][0] is model["b"][0]
    assert type(model["small"]) is nn.Linear and type(model["odd"]) is nn.Linear
    assert type(model["trainable"]) is nn.Linear and type(model["subclass"]) is Sub

    model = nn.ModuleDict({"odd": lin(64, 72), "small": lin(64, 16)})
    assert convert_linears_to_fp8_storage(model, min_features=32) == ["odd"]  # no multiple-of-16 rule
    assert isinstance(model["odd"], Fp8StorageLinear)


def _tiny_step(transformer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(51)
    hidden = torch.randn(1, 3, 16, 8, 12, generator=g).to(torch.bfloat16).requires_grad_()
    text = torch.randn(1, 16, 32, generator=g).to(torch.bfloat16)
    out = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([500]),
                      return_dict=False)[0]
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    return out.detach(), hidden.grad, grads


TINY_DB = {"tensorwise": (25.0, 19.0, 16.0), "rowwise": (25.0, 21.0, 16.0), "storage": (28.0, 25.0, 19.0)}


@pytest.mark.parametrize("kind", TINY_DB)
def test_tiny_cogvideox_with_lora(tiny_checkpoint, kind):
    from fastcog.lora import load_trainable_state_dict, trainable_state_dict

    ref = tiny_lora_transformer(tiny_checkpoint("cogvideox-5b"))
    model = copy.deepcopy(ref)
    lora_before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen_linears = {n for n, mod in model.named_modules()
                      if type(mod) is nn.Linear and not re.search(r"\.lora_[AB]\.", n)}
    if kind == "storage":
        names = convert_linears_to_fp8_storage(model, min_features=16)
    else:
        names = convert_linears_to_fp8(model, kind, min_features=16)

    # Every frozen linear of the tiny model is converted (all widths are multiples of 16 here); the
    # peft wrappers keep their adapters, the same Parameter objects under the same names.
    assert set(names) == frozen_linears
    assert "transformer_blocks.0.attn1.to_q.base_layer" in names
    assert all(".lora_" not in n for n in names)
    lora_after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora_after.keys() == lora_before.keys() and all(lora_after[n] is p for n, p in lora_before.items())
    assert all(type(mod) is nn.Linear for n, mod in model.named_modules() if re.search(r"\.lora_[AB]\.\w+$", n))

    # Trainable state round-trips by the same names; the frozen FP8 buffers are not in the state_dict.
    state = trainable_state_dict(ref)
    load_trainable_state_dict(model, state)
    assert set(trainable_state_dict(model)) == set(state)
    assert set(model.state_dict()) <= set(ref.state_dict())

    # 21 quantised linears, several in series, and gradients through all of them. Measured
    # (output / input gradient / worst LoRA gradient): tensorwise 28.9 / 21.8 / 18.7 dB, rowwise
    # 28.6 / 23.8 / 19.2, storage 31.7 / 28.0 / 21.8; thresholds about 3 dB below.
    out_db, dh_db, lora_db = TINY_DB[kind]
    out_ref, dh_ref, grads_ref = _tiny_step(ref)
    out, dh, grads = _tiny_step(model)
    assert sqnr_db(out_ref, out) > out_db
    assert sqnr_db(dh_ref, dh) > dh_db
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert sqnr_db(grads_ref[name], g) > lora_db, name


def test_5b_shapes_convert_the_block_linears_and_skip_the_small_ones():
    """The real 5B architecture on the meta device (nothing allocated), min_features = 1024."""
    from diffusers import CogVideoXTransformer3DModel

    from fastcog.variants import FULL_TRANSFORMER_CONFIGS

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**FULL_TRANSFORMER_CONFIGS["cogvideox-5b"]).requires_grad_(False)
    names = convert_linears_to_fp8(model, "rowwise", min_features=1024)
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
    expected = {"patch_embed.text_proj"} | {f"transformer_blocks.{i}.{s}" for i in range(42) for s in per_block}
    assert set(names) == expected
    skipped = {n for n, mod in model.named_modules() if type(mod) is nn.Linear}
    assert skipped == {"time_embedding.linear_1", "time_embedding.linear_2", "norm_out.linear", "proj_out"} | {
        f"transformer_blocks.{i}.norm{j}.linear" for i in range(42) for j in (1, 2)
    }
    assert model.transformer_blocks[0].ff.net[2].weight_t_fp8.shape == (12288, 3072)
