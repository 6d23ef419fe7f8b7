"""fast.fused_qkv (fastcog.fast.qkv): q/k/v as one GEMM over the concatenated frozen weights.

* One attention's three projections: the output and every gradient (x and the six adapters) equal the three
  separate peft layers', for both implementations (fused: the interpreted Triton kernels; unfused: cuBLAS
  + addmm), on a plain base in fp32 (tight) and bf16, and on a rowwise FP8 base; the frozen tensors become
  views of the concatenation (no second copy).
* What keeps the three layers, and why: peft's forward, tensorwise FP8, unequal ranks, dropout, FSDP, the
  reference processor.
* The tiny model built with the flagship switches and fast.fused_qkv: every attention fused (one FP8 op launch
  for q/k/v), the parameter names, state_dict and exported LoRA those of the same build without fused_qkv,
  one block's output and adapter gradients equal (tests/eager_kernels.py's stand-ins), and
  torch.compile(fullgraph=True) traces the processor.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastcog.build import FastReport, build_training_model, fuse_qkv
from fastcog.config import load_config
from fastcog.fast import lora, qkv
from fastcog.fast.fp8 import convert_linears_to_fp8
from fastcog.lora import export_lora
from tests.eager_kernels import use_eager_kernels
from tests.fp8_runs import ROWWISE_ON_CPU

PROJ = qkv.PROJECTIONS
FLAGSHIP = Path(__file__).resolve().parents[1] / "configs" / "t2v_h100.yaml"
TOKENS = 72  # video tokens of the tiny model's 9x64x96 clips; its text is 16 tokens
NO_ROWWISE = "this torch's CPU _scaled_mm has no rowwise scales (the peft reference and the tiny model's FP8)"


def attention(base: str, ranks=(4, 4, 4), dropout: float = 0.0) -> nn.Module:
    """to_q / to_k / to_v as peft LoRA Linears 32 -> 48 (alpha 8, bias, fp32 adapters, non-zero B) on a base
    `linear-fp32`, `linear-bf16` or `fp8-<recipe>` (from bf16 weights)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    attn = nn.Module()
    for name in PROJ:
        setattr(attn, name, nn.Linear(32, 48))
    for name, r in zip(PROJ, ranks, strict=True):  # one adapter config per projection: ranks may differ
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=[name], lora_dropout=dropout), attn)
    attn.requires_grad_(False)
    for name in PROJ:
        layer = getattr(attn, name)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_A["default"].weight.requires_grad_(True)
        layer.lora_B["default"].weight.requires_grad_(True)
        if base != "linear-fp32":
            layer.base_layer.to(torch.bfloat16)
    if base.startswith("fp8-"):
        convert_linears_to_fp8(attn, base.removeprefix("fp8-"), min_features=16)
    return attn


def adapters(attn: nn.Module) -> list[torch.Tensor]:
    return [getattr(attn, n).lora_A["default"].weight for n in PROJ] + [getattr(attn, n).lora_B["default"].weight
                                                                        for n in PROJ]


def run(attn: nn.Module, x: torch.Tensor, dys, autocast: bool, fused: bool):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        outs = qkv.project(attn, x) if fused else [getattr(attn, n)(x) for n in PROJ]
    grads = torch.autograd.grad(outs, [x, *adapters(attn)], [dy.to(o.dtype) for dy, o in zip(dys, outs, strict=True)])
    return [o.detach() for o in outs] + list(grads)


# (base, autocast, x dtype, relative tolerance): as tests/test_lora_routing.py's CASES. fp32: summation
# order only. bf16 compute: a few bf16 ulps (peft rounds the LoRA term and the sum separately). FP8 rowwise:
# the same quantised bits for x, dy and W; W.T requantised with shared row scales, within the bf16 tolerance.
CASES = {
    "linear-fp32": ("linear-fp32", False, torch.float32, 1e-5),
    "linear-bf16-autocast": ("linear-bf16", True, torch.float32, 2e-2),
    "fp8-rowwise-autocast": ("fp8-rowwise", True, torch.float32, 2e-2),
}
WHAT = ("q", "k", "v", "dx", "dAq", "dAk", "dAv", "dBq", "dBk", "dBv")


@pytest.mark.parametrize("impl", ["fused", "unfused"])
@pytest.mark.parametrize("case", CASES)
def test_fused_projection_gives_the_three_layers_output_and_gradients(case, impl):
    base, autocast, x_dtype, rtol = CASES[case]
    if base == "fp8-rowwise" and not ROWWISE_ON_CPU:
        pytest.skip(NO_ROWWISE)
    attn = attention(base)
    g = torch.Generator().manual_seed(1)
    x, dys = torch.randn(2, 9, 32, generator=g).to(x_dtype), [torch.randn(2, 9, 48, generator=g) for _ in PROJ]
    want = run(attn, x, dys, autocast, fused=False)
    lora.route_lora(attn, lambda name, module: impl)
    assert qkv.why_not(attn) is None
    qkv.fuse_attention(attn)
    assert getattr(attn, qkv.FLAG) == impl
    got = run(attn, x, dys, autocast, fused=True)
    for what, a, b in zip(WHAT, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
        assert err <= rtol, f"{impl} {what}: {err:.1e} relative > {rtol:.0e}"
    # The projections' frozen tensors are slices of the concatenation: one copy of the weights.
    names = ("weight_fp8", "weight_t_fp8") if base.startswith("fp8") else ("weight",)
    whole = {n: getattr(attn, f"qkv_{n}") for n in names}
    for n in names:
        for proj in PROJ:
            t = getattr(getattr(attn, proj).base_layer, n)
            assert t.untyped_storage().data_ptr() == whole[n].untyped_storage().data_ptr(), (proj, n)
    assert not attn.state_dict().keys() & {"qkv_weight", "qkv_bias", "qkv_weight_fp8"}


@pytest.mark.parametrize("kind", ["peft", "tensorwise", "ranks", "dropout"])
def test_what_keeps_three_layers(kind):
    base = "fp8-tensorwise" if kind == "tensorwise" else "linear-bf16"
    attn = attention(base, ranks=(4, 4, 8) if kind == "ranks" else (4, 4, 4),
                     dropout=0.1 if kind == "dropout" else 0.0)
    lora.route_lora(attn, lambda name, module: "peft" if kind == "peft" else "fused")
    want = {"peft": "q/k/v run peft's forward (fast.lora_kernel)",
            "tensorwise": "tensorwise FP8 bases (one scale per projection)",
            "ranks": "q/k/v LoRA ranks, widths or scales differ",
            "dropout": "q/k/v are not all fusable LoRA linears"}[kind]
    assert qkv.why_not(attn) == want


@pytest.fixture(scope="module")
def model_path(tiny_checkpoint):
    return tiny_checkpoint("cogvideox-5b")


def test_fsdp_and_the_reference_processor_keep_three_layers():
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Module()])
    model.transformer_blocks[0].attn1 = attention("linear-bf16")
    lora.route_lora(model, lambda name, module: "unfused")
    assert qkv.why_not(model.transformer_blocks[0].attn1) is None  # it would fuse but for these two
    for attention_backend, strategy, line in (
            ("sdpa", "fsdp", "fused qkv: off under FSDP (the concatenated weights would not be sharded)"),
            ("reference", "none", "fused qkv: off (it runs in fastcog's attention processor: set fast.attention)")):
        report = FastReport()
        fuse_qkv(model, attention_backend, strategy, report)
        assert report.lines == [line] and report.fused_qkv == 0
        assert not hasattr(model.transformer_blocks[0].attn1, qkv.FLAG)


def build(model_path, tmp_path, fused: bool):
    """configs/t2v_h100.yaml on the tiny model (as tests/test_lora_routing.py builds it), fused_qkv on or off."""
    cfg = load_config(FLAGSHIP, [f"model.path={model_path}", "model.variant=auto", f"data.data_root={tmp_path}",
                                 f"train.output_dir={tmp_path / 'out'}", "fast.compile=false", "fast.attention=sdpa",
                                 "fast.fp8_min_features=16", "fast.fp8=rowwise",
                                 f"fast.fused_qkv={str(fused).lower()}"])
    built = build_training_model(cfg, torch.device("cpu"), tokens_per_sample=TOKENS, verbose=False)
    model = built.par.module
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero B, the same in both builds, so the LoRA terms count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, model, built.report


def block_step(model: nn.Module):
    torch.manual_seed(4)
    block, width = model.transformer_blocks[0], model.config.num_attention_heads * model.config.attention_head_dim
    bf16 = torch.bfloat16
    hidden = torch.randn(1, TOKENS, width, dtype=bf16)
    text, temb = torch.randn(1, 16, width, dtype=bf16), torch.randn(1, model.config.time_embed_dim, dtype=bf16)
    with torch.autocast("cpu", bf16):
        out = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=None)
    params = [p for n, p in block.attn1.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(sum(o.float().square().mean() for o in out), params)
    return [o.detach() for o in out], grads


@pytest.mark.skipif(not ROWWISE_ON_CPU, reason=NO_ROWWISE)
def test_flagship_build_fuses_every_attention_and_changes_no_name_or_export(model_path, tmp_path, monkeypatch):
    cfg, fused, report = build(model_path, tmp_path / "a", True)
    _, plain, plain_report = build(model_path, tmp_path / "b", False)
    blocks = len(fused.transformer_blocks)
    assert cfg.fast.fused_qkv and report.fused_qkv == blocks and plain_report.fused_qkv == 0
    assert f"fused qkv: {blocks} attentions" in report.lines
    assert all(getattr(b.attn1, qkv.FLAG) == "fused" for b in fused.transformer_blocks)
    # Names, state_dict and the exported LoRA: exactly the build without fused_qkv.
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    want, got = plain.state_dict(), fused.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    exports = [load_file(export_lora(m, cfg.lora, tmp_path / name, is_i2v=False))
               for name, m in (("fused", fused), ("plain", plain))]
    assert exports[0].keys() == exports[1].keys() and all(torch.equal(exports[0][k], exports[1][k]) for k in exports[1])

    # One block forward + backward on the kernels' eager stand-ins: the fused op runs for q/k/v together.
    use_eager_kernels(monkeypatch)
    op, calls = importlib.import_module("fastcog.kernels.lora_linear_fp8_op"), []
    launch = op._lora_fp8_forward
    monkeypatch.setattr(op, "_lora_fp8_forward", lambda *args: calls.append(args[0].shape) or launch(*args))
    out_f, grads_f = block_step(fused)
    assert len(calls) == 2, calls  # q/k/v together, then to_out
    out_p, grads_p = block_step(plain)
    assert len(calls) == 2 + 4
    for a, b in zip([*out_f, *grads_f], [*out_p, *grads_p], strict=True):
        err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
        assert err <= 2e-2, err

    # The processor traces as one graph with the fused projection.
    attn = fused.transformer_blocks[0].attn1
    width = attn.to_q.base_layer.in_features
    x, text = torch.randn(1, 8, width, dtype=torch.bfloat16), torch.randn(1, 4, width, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        compiled = torch.compile(lambda h, e: attn.processor(attn, h, e), fullgraph=True, backend="aot_eager")
        got, want = compiled(x, text)[0].detach(), attn.processor(attn, x, text)[0].detach()
    # fullgraph=True raises on a graph break. Compiled and eager FP8 attention differ by a few % of the largest
    # value on this tiny layer with or without fused_qkv (2 to 4%, seen on the three-layer processor too).
    assert got.shape == want.shape and float((got - want).abs().max() / want.abs().max()) <= 1e-1
