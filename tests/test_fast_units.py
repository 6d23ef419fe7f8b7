"""The fast path's parts on the tiny model: graph breaks, what each checkpointing policy keeps,
the activation estimate behind `auto`, backend choice, names, and the errors a user can hit."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcog.build import parallelize_model
from fastcog.config import config_from_dict
from fastcog.errors import ConfigError
from fastcog.fast import checkpointing as ac
from fastcog.fast.attention import ATTENTION_OPS, choose_backend
from fastcog.lora import inject_lora, trainable_state_dict
from fastcog.models import load_components

TOKENS = 3 * 4 * 6  # 3 latent frames of 8x12 latents, patch 2


def make_cfg(path, fast=None, policy="none", **sections):
    raw = {"model": {"path": str(path), "dtype": "fp32"}, "data": {"data_root": "unused"},
           "lora": {"rank": 4, "alpha": 8}, "train": {"activation_checkpointing": policy}, "fast": fast or {}}
    raw.update(sections)
    return config_from_dict(raw)


def patched_model(path, fast=None, policy="none", **sections):
    cfg = make_cfg(path, fast, policy, **sections)
    model = load_components(path, cfg.model.dtype, parts=("transformer",)).transformer
    torch.manual_seed(0)
    inject_lora(model, cfg.lora)
    with torch.no_grad():  # non-zero B so the LoRA term is part of every output and gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    report = parallelize_model(model, cfg, torch.device("cpu"), tokens_per_sample=TOKENS, verbose=False).report
    return model, report


def block_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    width = c.num_attention_heads * c.attention_head_dim
    rot = torch.randn(TOKENS, c.attention_head_dim, generator=g)
    return {
        "hidden_states": torch.randn(1, TOKENS, width, generator=g, requires_grad=True),
        "encoder_hidden_states": torch.randn(1, c.max_text_seq_length, width, generator=g, requires_grad=True),
        "temb": torch.randn(1, c.time_embed_dim, generator=g),
        "image_rotary_emb": (rot.cos(), rot.sin()),
    }


@pytest.fixture(scope="module")
def model_path(tiny_checkpoint):
    return tiny_checkpoint("cogvideox-5b")


@pytest.mark.parametrize("fast,policy", [
    ({"lora_kernel": True, "attention": "sdpa"}, "selective"),
    ({"lora_kernel": True, "attention": "sdpa"}, "full"),
    ({"attention": "sdpa", "fp8": "tensorwise", "fp8_min_features": 16}, "none"),
])
def test_a_patched_block_compiles_without_graph_breaks(model_path, fast, policy):
    import torch._dynamo

    torch._dynamo.reset()
    model, _ = patched_model(model_path, fast, policy, model={"path": str(model_path), "dtype": "bf16"})
    block = model.transformer_blocks[0]
    inputs = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in block_inputs(model).items()}
    explanation = torch._dynamo.explain(block)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


class CountAttention(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy,attention_runs", [("none", 1), ("selective", 1), ("full", 2), ("offload", 2)])
def test_checkpointing_policy_decides_whether_attention_is_recomputed(model_path, policy, attention_runs):
    model, _ = patched_model(model_path, {"attention": "sdpa"}, policy)
    block = model.transformer_blocks[0]
    inputs = block_inputs(model)
    with CountAttention() as count:
        out, enc = block(**inputs)
        (out.square().sum() + enc.square().sum()).backward()
    assert count.calls == attention_runs


def test_checkpointed_block_gives_the_same_gradients(model_path, monkeypatch):
    """Every policy gives `none`'s gradients bit for bit; `offload` copies exactly the block's saved
    inputs (the estimate's saved_inputs) to the host and brings each back once."""
    grads, host, back = {}, [], []
    copy_out, copy_in = ac.host_copy, ac.device_copy
    monkeypatch.setattr(ac, "host_copy", lambda t: host.append(t.nbytes) or copy_out(t))
    monkeypatch.setattr(ac, "device_copy", lambda p: back.append(p[1].nbytes) or copy_in(p))
    for policy in ac.POLICIES:
        model, _ = patched_model(model_path, {"attention": "sdpa"}, policy)
        inputs = block_inputs(model)
        out, enc = model.transformer_blocks[0](**inputs)
        (out.square().sum() + enc.square().sum()).backward()
        grads[policy] = (inputs["hidden_states"].grad, inputs["encoder_hidden_states"].grad,
                         [p.grad for p in model.transformer_blocks[0].parameters() if p.requires_grad])
    for policy in ("selective", "full", "offload"):
        torch.testing.assert_close(grads[policy], grads["none"], rtol=0, atol=0)
    plain, _ = patched_model(model_path, {"attention": "sdpa"})
    estimate = ac.estimate_block_activations(plain, 1, TOKENS, torch.float32, torch.device("cpu"))
    assert sum(host) == estimate.saved_inputs > estimate.full
    assert sorted(back) == sorted(host)


def test_fake_estimate_equals_what_autograd_really_saves(model_path):
    model, _ = patched_model(model_path, {"attention": "sdpa"})
    estimate = ac.estimate_block_activations(model, 1, TOKENS, torch.float32, torch.device("cpu"))
    block = model.transformer_blocks[0]
    inputs = block_inputs(model)
    # Weights and the RoPE tables (shared by all blocks) are not per-block activations.
    params = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *inputs["image_rotary_emb"]]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(**inputs)
    assert estimate.none == sum(saved.values())
    inputs_bytes = inputs["hidden_states"].nbytes + inputs["encoder_hidden_states"].nbytes
    assert estimate.full == inputs_bytes
    assert estimate.full < estimate.selective < estimate.none
    assert estimate.blocks == len(model.transformer_blocks)


def test_choose_policy_takes_the_fastest_that_fits():
    e = ac.ActivationEstimate(none=100, full=10, selective=30, blocks=4)
    assert e.peak("none") == 400 and e.peak("selective") == 220 and e.peak("full") == 140
    assert ac.choose_policy(e, 400) == "none"
    assert ac.choose_policy(e, 399) == "selective"
    assert ac.choose_policy(e, 219) == "full"
    assert e.peak("offload") == 110  # one block's inputs and its full set, on the device
    assert ac.choose_policy(e, 139) == "offload"
    assert ac.choose_policy(e, 1) == "offload"  # nothing fits: the least memory
    assert ac.choose_policy(e, 139, offload=False) == ac.choose_policy(e, 1, offload=False) == "full"


def test_auto_logs_its_choice_and_estimate(model_path):
    _, roomy = patched_model(model_path, {"attention": "sdpa", "memory_margin_gb": 0}, "auto")
    assert roomy.activation_checkpointing == "none"
    _, tight = patched_model(model_path, {"attention": "sdpa", "memory_margin_gb": 1e6}, "auto")
    assert tight.activation_checkpointing == "full"
    line = next(x for x in tight.lines if x.startswith("activation checkpointing"))
    assert "auto chose full" in line and "capacity" in line and f"{TOKENS} tokens" in line


def test_patches_keep_parameter_names(model_path):
    plain, _ = patched_model(model_path)
    fast, report = patched_model(model_path, {"lora_kernel": True, "attention": "sdpa"}, "selective")
    assert trainable_state_dict(plain).keys() == trainable_state_dict(fast).keys()
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert len(report.lora_kernel_linears) == 4 * len(fast.transformer_blocks)


def test_fp8_base_layers_run_the_fused_fp8_lora(model_path):
    model, report = patched_model(model_path, {"lora_kernel": True, "fp8": "rowwise", "fp8_min_features": 16},
                                  model={"path": str(model_path), "dtype": "bf16"})
    assert report.fp8_linears and report.lora_kernel_linears
    assert report.lora_counts["fused-fp8"] == len(report.lora_kernel_linears) and report.lora_counts["fused"] == 0


def test_kernels_without_gpu_or_interpreter_is_a_config_error(model_path, monkeypatch):
    import fastcog.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    for switch in ("lora_kernel", "fused_loss"):
        with pytest.raises(ConfigError, match=f"fast.{switch}.*CUDA GPU"):
            patched_model(model_path, {switch: True})


def test_attention_backend_choice_on_cpu():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu).backend == "sdpa"
    assert choose_backend("math", cpu).backend == "math"
    for needs_gpu in ("cudnn", "efficient", "fa3", "flash_attn"):
        with pytest.raises(ConfigError, match=f"fast.attention={needs_gpu} needs a CUDA GPU"):
            choose_backend(needs_gpu, cpu)


def test_each_attention_backend_matches_diffusers(model_path):
    ref, _ = patched_model(model_path)
    inputs = block_inputs(ref)
    want = ref.transformer_blocks[0](**inputs)
    for backend in ("sdpa", "math", "flash"):
        model, report = patched_model(model_path, {"attention": backend})
        assert report.attention_backend == backend
        got = model.transformer_blocks[0](**inputs)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_switch_that_cannot_run_fails_before_the_output_dir_is_touched(model_path, tmp_path, monkeypatch):
    import fastcog.kernels._common as common

    from fastcog.trainer import train

    monkeypatch.setattr(common, "INTERPRET", False)
    out = tmp_path / "run"
    cfg = make_cfg(model_path, {"fused_loss": True}, "none",
                   data={"data_root": str(tmp_path / "clips"), "num_frames": 9, "height": 64, "width": 96},
                   train={"output_dir": str(out), "activation_checkpointing": "none"})
    with pytest.raises(ConfigError, match="fast.fused_loss"):
        train(cfg)
    assert not out.exists() and not (tmp_path / "clips").exists()


def one_lora_linear() -> torch.nn.Module:
    """A single peft LoRA Linear with an fp32 base and fp32 adapters (B non-zero), patched to the fused kernel."""
    from peft import LoraConfig, inject_adapter_in_model

    from fastcog.fast.lora import use_fused_lora

    torch.manual_seed(0)
    net = torch.nn.Module()
    net.proj = torch.nn.Linear(32, 24)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0), net)
    net.requires_grad_(False)
    with torch.no_grad():
        net.proj.lora_B["default"].weight.normal_(0, 0.1)
    assert use_fused_lora(net) == ["proj"]
    return net.proj


def test_fused_lora_computes_in_the_autocast_dtype():
    """fp32 frozen weights under bf16 autocast: the fused kernel runs in bf16, as peft's linears do under
    autocast; without autocast an fp32 base computes in fp32."""
    from peft.tuners.lora import Linear as LoraLinear

    layer = one_lora_linear()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = layer(x), LoraLinear.forward(layer, x)
    assert fused.dtype == unfused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, unfused, rtol=2e-2, atol=2e-2)
    fused, unfused = layer(x), LoraLinear.forward(layer, x)
    assert fused.dtype == unfused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
