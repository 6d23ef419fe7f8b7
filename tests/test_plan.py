"""`fastcog plan` and the estimate it shares with `activation_checkpointing: auto` (fastcog.plan)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fastcog.plan
from fastcog.cli import main
from fastcog.config import save_config
from tests.runs import make_cfg


@pytest.fixture()
def tiny_config(tiny_checkpoint, clips, tmp_path):
    def write(**sections) -> str:
        cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", **sections)
        save_config(cfg, tmp_path / "run.yaml")
        return str(tmp_path / "run.yaml")

    return write


def plan_json(capsys, *argv: str) -> list[dict]:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_planned_weights_are_the_trained_models(tiny_checkpoint, clips, tmp_path, tiny_config, capsys):
    """Built with no weights (meta), the plan counts exactly the bytes the trainer's model holds."""
    from fastcog.build import load_transformer

    path = tiny_config(model={"dtype": "bf16"}, lora={"rank": 4, "alpha": 8})
    [plan] = plan_json(capsys, path, "--gpu", "rtx4090")
    model = load_transformer(make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out",
                                      model={"dtype": "bf16"}, lora={"rank": 4, "alpha": 8}), torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    assert plan["trainable_params"] == sum(p.numel() for p in trainable) > 0
    assert plan["bytes"]["trainable_weights"] == sum(p.nbytes for p in trainable)
    assert plan["bytes"]["frozen_weights"] == sum(t.nbytes for t in frozen)
    assert plan["bytes"]["gradients"] == 4 * plan["trainable_params"]
    assert plan["bytes"]["optimizer_state"] == 8 * plan["trainable_params"]  # AdamW: two fp32 moments
    assert all(isinstance(v, int) for v in plan["bytes"]["peak"].values())


def test_fsdp_ranks_hold_a_share_and_ddp_ranks_the_whole(tiny_config, capsys):
    fsdp, ddp = plan_json(capsys, tiny_config(), "--nproc", "2")
    assert (fsdp["strategy"], ddp["strategy"]) == ("fsdp", "ddp")
    for kind in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state"):
        assert fsdp["bytes"][kind] == ddp["bytes"][kind] // 2
    assert fsdp["communication_bytes_per_step"] > ddp["communication_bytes_per_step"] > 0
    assert fsdp["auto_strategy"] == ddp["auto_strategy"]
    assert fsdp["auto_strategy"]["strategy"] == "ddp" and "replicated model fits" in fsdp["auto_strategy"]["why"]


def test_the_block_estimate_matches_what_autograd_really_saves(tiny_checkpoint, clips, tmp_path):
    """The fake-tensor estimate against a real forward of block 0 on CPU: the bytes of every distinct
    storage autograd saves (weights excluded), measured with real tensors."""
    from fastcog.build import load_transformer
    from fastcog.fast import checkpointing as ac

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", lora={"rank": 4, "alpha": 8})
    model = load_transformer(cfg, torch.device("cpu"))
    tokens = 72
    estimate = ac.estimate_block_activations(model, 2, tokens, torch.float32, torch.device("cpu"))
    block = model.transformer_blocks[0]
    width = model.config.num_attention_heads * model.config.attention_head_dim
    weights = {t.untyped_storage()._cdata for t in [*block.parameters(), *block.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in weights:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    hidden = torch.randn(2, tokens, width, requires_grad=True)
    text = torch.randn(2, model.config.max_text_seq_length, width, requires_grad=True)
    temb = torch.randn(2, model.config.time_embed_dim)
    from fastcog.models import read_variant
    from fastcog.objective import RotaryCache

    rope = RotaryCache(read_variant(cfg.model.path))(3, 8, 12, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
    measured = sum(saved.values()) - sum(t.untyped_storage().nbytes() for t in rope
                                         if t.untyped_storage()._cdata in saved)
    assert measured > 0
    assert estimate.none == pytest.approx(measured, rel=0.10)


def test_auto_checkpointing_and_plan_share_one_estimate(tiny_config, capsys, monkeypatch):
    """Both go through fastcog.plan.memory_plan: the trainer's `auto` chooses from it, and the plan
    command prints it."""
    from fastcog.build import _size
    from fastcog.config import load_config
    from fastcog.trainer import train

    calls, real = [], fastcog.plan.memory_plan

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        calls.append(plan)
        return plan

    monkeypatch.setattr(fastcog.plan, "memory_plan", spy)
    path = tiny_config(train={"train_steps": 1, "activation_checkpointing": "auto"},
                       fast={"attention": "sdpa", "memory_margin_gb": 0})
    train(load_config(path))
    [trainer_plan] = calls
    printed = capsys.readouterr().out
    chosen = next(line for line in printed.splitlines() if "auto chose" in line)
    assert f"auto chose {trainer_plan.choose_policy(10**15)}" in chosen  # plenty of host memory: none
    for policy in ("none", "selective", "full"):
        assert f"{policy} {_size(trainer_plan.peak(policy))}" in chosen, chosen
    plan_json(capsys, path)
    assert len(calls) == 2


def test_the_step_time_puts_attention_at_its_backends_rate(tiny_checkpoint, clips, tmp_path, monkeypatch):
    """The predicted step time moves by exactly the attention FLOPs' time when the backend's published
    rate changes; with no rate for it, attention is at the dense peak (the lower bound). MFU follows."""
    import fastcog.gpus as gpus
    from fastcog.plan_report import make_plan

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", fast={"attention": "cudnn"},
                   train={"activation_checkpointing": "full"})
    plan = make_plan(cfg, gpus.gpu_by_key("h100-80gb"))
    forward, backward = plan.attention_flops_per_step
    assert plan.attention.backend == "cudnn" and forward > 0
    assert forward == pytest.approx(2 * backward / 2.5)  # full recomputes attention's forward
    rates = gpus.ATTENTION_RATES["h100-80gb"]
    monkeypatch.setitem(rates, "cudnn", gpus.AttentionRate(100e12, 50e12, "test", "test"))
    slow = plan.step_time_s
    monkeypatch.setitem(rates, "cudnn", gpus.AttentionRate(200e12, 100e12, "test", "test"))
    assert slow - plan.step_time_s == pytest.approx(forward / 200e12 + backward / 100e12)
    assert plan.mfu == pytest.approx(plan.model_flops_per_step / (plan.step_time_s * 989e12))
    monkeypatch.delitem(rates, "cudnn")
    assert plan.attention_rate is None and plan.step_time_s == plan.step_time_lower_bound_s


def test_a_config_that_does_not_fit_names_the_switches_that_help(tiny_config, capsys):
    """The tiny model on a 24 GB card with all but 100 kB of it held back as margin: no policy fits, and
    each switch that lowers the peak is listed with what it saves."""
    margin_gib = (24e9 - 1e5) / 2**30
    path = tiny_config(train={"activation_checkpointing": "none"}, fast={"memory_margin_gb": margin_gib})
    assert main(["plan", path, "--gpu", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    assert "--set train.activation_checkpointing=full: saves" in out
    assert "--set optim.cpu_offload=True: saves" in out


def test_the_fit_check_stops_warns_or_passes(tiny_checkpoint, clips, tmp_path):
    """fastcog train's check on a GPU, before any weight is loaded: the tiny model on cards of made-up
    sizes around its estimated peak."""
    from fastcog.gpus import gpu_by_key
    from fastcog.plan_report import fit_verdict, make_plan

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out",
                   train={"activation_checkpointing": "none"}, fast={"memory_margin_gb": 0.001})
    gpu = gpu_by_key("rtx4090")
    peak = make_plan(cfg, gpu).memory.peak("none")
    margin = int(0.001 * 2**30)

    def verdict(memory: int) -> tuple[str, str]:
        return fit_verdict(cfg, make_plan(cfg, dataclasses.replace(gpu, memory_bytes=memory)))

    assert verdict(peak + margin)[0] == "fits"
    kind, line = verdict(peak + margin // 2)
    assert kind == "tight" and "no room for error" in line
    kind, line = verdict(peak * 4 // 5)  # the full policy saves more than the missing fifth
    assert kind == "too big"
    assert "more than this GPU's" in line and "--set train.activation_checkpointing=full saves" in line
    assert "fast.fit_check=false" in line


def test_auto_strategy_replicates_lora_when_it_fits(tiny_checkpoint, clips, tmp_path):
    from fastcog.gpus import gpu_by_key
    from fastcog.plan_report import auto_strategy, make_plan

    def cfg(**sections):
        return make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", fast={"memory_margin_gb": 0.0},
                        **sections)

    peak = make_plan(cfg(), gpu_by_key("rtx4090"), 2, "ddp").memory.peak("none")
    roomy, small = (dataclasses.replace(gpu_by_key("rtx4090"), memory_bytes=m) for m in (peak, peak - 1))
    assert auto_strategy(cfg(), roomy, 2)[0] == "ddp"
    strategy, why, _ = auto_strategy(cfg(), small, 2)
    assert strategy == "fsdp" and "does not fit" in why
    assert auto_strategy(cfg(model={"training_type": "sft"}), roomy, 2)[0] == "fsdp"
    assert auto_strategy(cfg(), None, 2) == ("fsdp", "no GPU memory to plan DDP against", None)


def test_cuda_autocast_rules_cast_as_cuda_does():
    """On the meta device (a GPU run planned without one), CUDA autocast's casts: the matmul family and
    attention in the compute dtype, layer norm and softmax in fp32, the rest as its inputs promote;
    fp64 and FP8 tensors never cast."""
    import torch.nn.functional as F

    from fastcog.fast.autocast import training_autocast

    x, w = torch.empty(2, 8, 16, device="meta", dtype=torch.bfloat16), torch.empty(4, 16, device="meta")
    q = torch.empty(1, 2, 8, 16, device="meta")
    with training_autocast(torch.device("meta"), torch.bfloat16, cuda_rules=True):
        assert F.linear(x.float(), w).dtype == torch.bfloat16
        assert (x.float() @ w.t()).dtype == torch.bfloat16
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
        assert F.layer_norm(x, (16,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert (x * w[0]).dtype == torch.float32  # not listed: promotes
        assert F.gelu(x).dtype == torch.bfloat16
        assert F.linear(x.double(), w.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="no autocast"):
        with training_autocast(torch.device("meta"), torch.bfloat16):
            pass


@pytest.mark.gpu
def test_the_cuda_rules_give_the_estimate_of_cudas_own_autocast(tiny_checkpoint, clips, tmp_path):
    """On a GPU: the block estimate under CudaAutocastRules on the meta device (`fastcog plan`) equals
    the one under torch's CUDA autocast on the GPU (the trainer's), bf16, LoRA."""
    from fastcog.build import load_transformer
    from fastcog.fast import checkpointing as ac
    from fastcog.plan import gpu_attention
    from fastcog.plan_report import architecture, weightless_transformer

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", model={"dtype": "bf16"},
                   lora={"rank": 4, "alpha": 8})
    planned = weightless_transformer(architecture(cfg, None), cfg)
    trained = load_transformer(cfg, torch.device("cuda"))
    with gpu_attention():
        on_meta = ac.estimate_block_activations(planned, 2, 72, torch.bfloat16, torch.device("meta"), cuda_rules=True)
        on_gpu = ac.estimate_block_activations(trained, 2, 72, torch.bfloat16, torch.device("cuda"))
    assert on_meta == on_gpu
