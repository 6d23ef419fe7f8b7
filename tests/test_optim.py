"""Every optim.name: builds, steps, follows the LR schedule, keeps its state through save/load, and
trains the tiny demo model; optional packages and cpu_offload fail with messages that say what to do.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fastcog.trainer
from fastcog.config import OPTIMIZERS, Config, OptimConfig, config_from_dict, validate
from fastcog.data.synthetic import make_synthetic_dataset
from fastcog.errors import ConfigError
from fastcog.optim import build_optimizer, check_optimizer_available, optimizer_state_bytes
from fastcog.optimizers import OPTIMIZER_SPECS
from fastcog.parallel import check_optimizer
from fastcog.plan import optimizer_bytes
from fastcog.trainer import train

LOW_BIT = ("adamw8bit_bnb", "adamw8bit", "adamw4bit", "adamw_fp8")
TORCHAO = ("adamw8bit", "adamw4bit", "adamw_fp8")
# Shapes of the tiny model's LoRA at rank 128 (inner dim 32): 4096 values, the smallest tensor the
# low-bit optimizers quantise, and a 16-value tensor they keep in fp32.
BIG, SMALL = (128, 32), (16,)


def make_cfg(name: str, **optim: Any) -> Config:
    lr = 1.0 if name == "prodigy" else 1e-2
    cfg = config_from_dict({"model": {"path": "unused"}, "data": {"data_root": "unused"},
                            "optim": {"name": name, "lr": lr, "lr_warmup_steps": 2, **optim}})
    validate(cfg)
    return cfg


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(BIG, generator=g)),
            torch.nn.Parameter(torch.randn(SMALL, generator=g))]


def run_steps(params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, steps: range) -> None:
    """Deterministic gradients that depend on the parameters (so any state difference shows in them)."""
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=g)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def is_quantised(state: dict[str, Any]) -> bool:
    """torchao keeps low-bit states as tensor subclasses; bitsandbytes as uint8 tensors."""
    return any(torch.is_tensor(v) and (type(v) is not torch.Tensor or v.dtype == torch.uint8) for v in state.values())


# --------------------------------------------------------------------------------------------
# Unit: build, step, schedule, state size, save/load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_builds_steps_and_follows_the_schedule(name: str) -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer, scheduler = build_optimizer(make_cfg(name), params, total_steps=4)
    assert isinstance(optimizer, torch.optim.Optimizer)
    lrs = []
    for step in range(3):
        lrs.append(float(scheduler.get_last_lr()[0]))
        run_steps(params, optimizer, scheduler, range(step, step + 1))
    # constant_with_warmup over 2 steps: 0, lr/2, lr; the value the optimizer reads is the scheduled one
    peak = 1.0 if name == "prodigy" else 1e-2
    assert lrs == pytest.approx([0.0, peak / 2, peak])
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(peak)
    for p, p0 in zip(params, before):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, p0), f"{name} did not change a {tuple(p.shape)} parameter"
    # The size threshold: 4096 values get low-bit state, 16 values stay fp32.
    big, small = (optimizer.state[p] for p in params)
    assert is_quantised(big) == (name in LOW_BIT)
    assert not is_quantised(small)


def test_state_bytes_count_the_quantised_internals() -> None:
    """AdamW: 2 fp32 moments + a 4-byte step. torchao 8-bit: per moment 1 byte per value, one fp32
    scale per 256-value block and its 256-entry fp32 map (not the 4 bytes per value its nbytes reports)."""
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        params = make_params()
        optimizer, scheduler = build_optimizer(make_cfg(name), params, total_steps=2)
        run_steps(params, optimizer, scheduler, range(1))
        sizes[name] = optimizer_state_bytes(optimizer)
    big, small = 128 * 32, 16
    assert sizes["adamw"] == 8 * (big + small) + 2 * 4
    assert sizes["adamw8bit"] == 2 * (big + big // 256 * 4 + 256 * 4) + 8 * small + 2 * 4


# One matrix every low-bit optimizer quantises (>= 4096 values, a multiple of 256) and CAME factors,
# large enough that per-tensor extras (torchao's 2 KB quantisation maps, CAME's row and column
# statistics, the step counters) stay under 1% of the state.
REGISTRY_SHAPE = (512, 512)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_registry_state_bytes_are_what_the_optimizer_keeps(name: str) -> None:
    """fastcog.optimizers' bytes per value (which fastcog.plan.optimizer_bytes uses for `fastcog plan` and
    train.activation_checkpointing=auto) against the state the real optimizer holds after one step."""
    params = [torch.nn.Parameter(0.1 * torch.randn(REGISTRY_SHAPE, generator=torch.Generator().manual_seed(0)))]
    optimizer, scheduler = build_optimizer(make_cfg(name), params, total_steps=2)
    run_steps(params, optimizer, scheduler, range(1))
    values = params[0].numel()
    measured = optimizer_state_bytes(optimizer) / values
    assert OPTIMIZER_SPECS[name].state_bytes == pytest.approx(measured, rel=0.01)
    assert optimizer_bytes(values, make_cfg(name).optim) / values == pytest.approx(measured, rel=0.01)


def test_optimizer_bytes_counts_prodigys_copy_of_the_weights() -> None:
    """Prodigy keeps its two moments, s and the initial weights: 16 bytes per value; CPU offload keeps none on
    the device."""
    assert optimizer_bytes(1024, make_cfg("prodigy").optim) == 1024 * 16
    assert optimizer_bytes(1024, make_cfg("adamw").optim) == 1024 * 8
    assert optimizer_bytes(1024, dataclasses.replace(make_cfg("adamw").optim, cpu_offload=True)) == 0


def test_config_reaches_the_optimizer() -> None:
    def group(name: str, **optim: Any) -> dict[str, Any]:
        optimizer, _ = build_optimizer(make_cfg(name, **optim), make_params(), total_steps=2)
        return optimizer.param_groups[0]

    g = group("came", betas=[0.8, 0.9], came_betas3=0.99, came_eps1=1e-29, came_eps2=1e-15, weight_decay=0.01)
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.9, 0.99), (1e-29, 1e-15), 0.01)
    g = group("prodigy", prodigy_d_coef=2.0, prodigy_safeguard_warmup=False, betas=[0.8, 0.9])
    assert (g["d_coef"], g["safeguard_warmup"], g["decouple"], g["betas"]) == (2.0, False, True, (0.8, 0.9))
    assert group("adamw", fused=True)["fused"] is True
    assert group("adamw4bit", eps=1e-7)["eps"] == 1e-7


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_survives_save_and_load(name: str, tmp_path: Path) -> None:
    """2 steps, torch.save the state dicts, rebuild, load, 2 more == 4 steps straight, bit for bit.

    The control (rebuilt without loading) must differ: the comparison sees the optimizer state.
    """
    cfg = make_cfg(name)
    straight = make_params()
    optimizer, scheduler = build_optimizer(cfg, straight, total_steps=4)
    run_steps(straight, optimizer, scheduler, range(4))

    first = make_params()
    optimizer, scheduler = build_optimizer(cfg, first, total_steps=4)
    run_steps(first, optimizer, scheduler, range(2))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "state.pt")

    def resume(load: bool) -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(p.detach().clone()) for p in first]
        optimizer, scheduler = build_optimizer(cfg, params, total_steps=4)
        if load:
            blob = torch.load(tmp_path / "state.pt", weights_only=False)
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            # loading must not dequantise the states (it would still run, just not identically)
            assert is_quantised(optimizer.state[params[0]]) == (name in LOW_BIT)
        run_steps(params, optimizer, scheduler, range(2, 4))
        return params

    resumed = resume(load=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    fresh = resume(load=False)
    assert not all(torch.equal(a, b) for a, b in zip(straight, fresh))


# --------------------------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if OPTIMIZER_SPECS[n].pip != "torch"])
def test_missing_package_names_the_pip_package(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, pip_name = OPTIMIZER_SPECS[name].module, OPTIMIZER_SPECS[name].pip
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=f"pip install {pip_name}"):
        check_optimizer_available(make_cfg(name))
    with pytest.raises(ConfigError, match=f"pip install {pip_name}"):
        build_optimizer(make_cfg(name), make_params(), total_steps=2)


def test_prodigy_warns_when_lr_is_not_about_one() -> None:
    with pytest.warns(UserWarning, match="expects lr about 1.0"):
        build_optimizer(make_cfg("prodigy", lr=2e-5), make_params(), total_steps=2)


@pytest.mark.parametrize("optim, model, match", [
    ({"name": "prodigy", "cpu_offload": True}, {}, "separate step-size estimate per tensor"),
    ({"cpu_offload": True}, {"dtype": "fp16"}, "use model.dtype: bf16"),
    ({"betas": [0.9, 1.0]}, {}, r"must be in \[0, 1\)"),
    ({"name": "adamw8bit", "fused": True}, {}, r"optim.fused=true applies to adamw / adam only"),
])
def test_validate_rejects_optimizer_combinations(optim: dict, model: dict, match: str) -> None:
    cfg = config_from_dict({"model": {"path": "unused", **model}, "data": {"data_root": "unused"}, "optim": optim})
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_refusal_and_its_alternatives_come_from_the_registry(name: str) -> None:
    """Refused: the optimizers measured to step FSDP's shards wrongly or not at all (tests/test_distributed.py);
    the message gives the registry's reason and lists every optimizer that can."""
    refused = {n for n, spec in OPTIMIZER_SPECS.items() if spec.fsdp_refusal}
    assert refused == {"came", "adamw8bit_bnb", "prodigy"}
    check_optimizer(OptimConfig(name=name), "ddp")
    if name not in refused:
        check_optimizer(OptimConfig(name=name), "fsdp")
        return
    with pytest.raises(ConfigError) as err:
        check_optimizer(OptimConfig(name=name), "fsdp")
    msg = str(err.value)
    assert f"optim.name={name!r} cannot run under FSDP: {OPTIMIZER_SPECS[name].fsdp_refusal}" in msg
    assert "parallel.strategy=ddp" in msg
    assert msg.rsplit("one of ", 1)[1].split(", ") == [n for n in OPTIMIZERS if n not in refused]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour; the GPU test below covers CUDA")
def test_cpu_offload_without_cuda_is_a_config_error() -> None:
    cfg = make_cfg("adamw", cpu_offload=True)
    with pytest.raises(ConfigError, match="optim.cpu_offload needs a CUDA device"):
        check_optimizer_available(cfg)
    with pytest.raises(ConfigError, match="optim.cpu_offload needs a CUDA device"):
        build_optimizer(cfg, make_params(), total_steps=2)


@pytest.mark.gpu
def test_cpu_offload_steps_on_clipped_gradients() -> None:
    """torchao copies each gradient to the host during backward, before the trainer clips it in place;
    fastcog's subclass copies the clipped gradient again. Adam is nearly invariant to gradient scale, so
    the check is on the host gradient itself; the parameters then match an on-device AdamW."""
    torch.manual_seed(0)
    ref_model = torch.nn.Linear(256, 64).cuda()  # weight 16384 values: offloaded; bias 64: stays on the GPU
    off_model = torch.nn.Linear(256, 64).cuda()
    off_model.load_state_dict(ref_model.state_dict())
    ref_opt, ref_sched = build_optimizer(make_cfg("adamw"), list(ref_model.parameters()), total_steps=6)
    off_opt, off_sched = build_optimizer(make_cfg("adamw", cpu_offload=True), list(off_model.parameters()), 6)
    x = 10 * torch.randn(8, 256, device="cuda")
    for _ in range(3):
        for model, opt, sched in ((ref_model, ref_opt, ref_sched), (off_model, off_opt, off_sched)):
            (model(x) ** 2).sum().backward()
            norm = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0))
            assert norm > 10, "clipping must be active for this test to mean anything"
            clipped = model.weight.grad.detach().cpu()
            opt.step()
            if opt is off_opt:
                torch.testing.assert_close(off_opt.param_d2h_map[off_model.weight].grad, clipped)
            sched.step()
            opt.zero_grad(set_to_none=True)
        assert {float(g["lr"]) for g in off_opt.param_groups} == {float(ref_opt.param_groups[0]["lr"])}
    for a, b in zip(ref_model.parameters(), off_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The demo: the real trainer on the tiny 5B-like model
# --------------------------------------------------------------------------------------------

# configs/demo.yaml's settings, with LoRA rank 128 (the reference default): at the demo's rank 16
# every LoRA tensor of the tiny model is below the 4096-value threshold and the low-bit optimizers
# would run entirely in fp32.
DEMO_LORA = {"rank": 128, "alpha": 128, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                           "ff.net.2"]}
STEPS = 30
# Prodigy grows its step size from d0 = 1e-6 by about 1.35x per step (measured): it reaches an
# AdamW-like 1e-2 only after ~40 steps, so it gets 60.
PRODIGY_STEPS = 60
# Margins. With lr 1e-7 (no learning) the last-10 / first-10 loss ratio is 0.96 at 30 steps and 0.98
# at 60 (the timesteps and noise make the loss vary by ~0.1 step to step), so TREND can fail.
# Every run draws the same batches, timesteps and noise (same seed; no optimizer draws random
# numbers), so comparing with the no-learning run at the same steps removes that variation: PAIRED.
TREND, PAIRED = 0.9, 0.85


@pytest.fixture(scope="module")
def demo(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    clips = tmp_path_factory.mktemp("optim_demo_clips")
    make_synthetic_dataset(clips, num_clips=4, num_frames=9, height=64, width=96, seed=0)
    return tiny_checkpoint("cogvideox-5b"), clips


def demo_cfg(demo: tuple[Path, Path], out: Path, name: str, lr: float, steps: int, **optim: Any) -> Config:
    model, clips = demo
    cfg = config_from_dict({
        "model": {"path": str(model), "dtype": "fp32"},
        "data": {"data_root": str(clips), "num_frames": 9, "height": 64, "width": 96,
                 "cache_dir": str(clips / "cache")},
        "lora": DEMO_LORA,
        "optim": {"name": name, "lr": lr, "lr_warmup_steps": 5, "weight_decay": 0.0, **optim},
        "train": {"output_dir": str(out), "seed": 0, "batch_size": 2, "train_steps": steps,
                  "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 0, "save_final": False},
        "log": {"report_to": "none", "progress_bar": False},
    })
    validate(cfg)
    return cfg


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


@pytest.fixture(scope="module")
def no_learning(demo: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Per-step losses of AdamW at lr 1e-7: the same draws as every run below, without learning."""
    return train(demo_cfg(demo, tmp_path_factory.mktemp("no_learning") / "run", "adamw", 1e-7, PRODIGY_STEPS)).losses


def test_no_learning_run_does_not_meet_the_margins(no_learning: list[float]) -> None:
    for steps in (STEPS, PRODIGY_STEPS):
        losses = no_learning[:steps]
        print(f"no learning, {steps} steps: first 10 {mean(losses[:10]):.4f}, last 10 {mean(losses[-10:]):.4f}")
        assert mean(losses[-10:]) > TREND * mean(losses[:10])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_converges_on_the_demo(name: str, demo: tuple[Path, Path], no_learning: list[float], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def recording_build(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        optimizer, scheduler = build_optimizer(*args, **kwargs)
        built.append(optimizer)
        return optimizer, scheduler

    steps = PRODIGY_STEPS if name == "prodigy" else STEPS
    lr = 1.0 if name == "prodigy" else 1e-2
    monkeypatch.setattr(fastcog.trainer, "build_optimizer", recording_build)
    losses = train(demo_cfg(demo, tmp_path / "run", name, lr, steps)).losses
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    first, last, baseline = mean(losses[:10]), mean(losses[-10:]), mean(no_learning[steps - 10:steps])
    print(f"{name}: first 10 {first:.4f}, last 10 {last:.4f}, no-learning last 10 {baseline:.4f}")
    assert last < TREND * first
    assert last < PAIRED * baseline
    # the real run used low-bit state (rank 128 puts every LoRA tensor at or above the threshold)
    (optimizer,) = built
    states = [s for s in optimizer.state.values() if s]
    assert states and all(is_quantised(s) == (name in LOW_BIT) for s in states)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour; test_cpu_offload_steps_on_clipped_gradients")
def test_trainer_refuses_cpu_offload_without_cuda(demo: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.cpu_offload needs a CUDA device"):
        train(demo_cfg(demo, tmp_path / "run", "adamw", 1e-2, 2, cpu_offload=True))
