"""The fast path against the reference path on tiny checkpoints of every variant.

Model-level parity (docs/design.md, "Testing"): the same seed, data and schedule through the real
trainer, once as the reference runs it and once with fastcog's patches (Triton kernels under
the interpreter, fastcog's attention processor, each checkpointing policy, compile on and
off); per-step losses and the final LoRA weights must agree.

Tolerances (fp32 everywhere, so the paths differ only by summation order):
* per-step loss: 2e-6 relative. Measured: at most 1.1e-7 on the first step (identical weights,
  kernels vs cuBLAS-style CPU GEMMs and a float64 vs fp32 loss) growing to ~3e-7 by step 20
  as the optimizer carries the differences forward.
* per-step pre-clip gradient norm: 2e-5 relative. Measured: about 1e-7.
* final LoRA weights: max |a - b| <= 1e-4 * max |a|. Measured: about 1e-6 to 2e-6, eager and
  compiled; a full-suite run once gave 1.6e-5 for the compiled cases (cause not found), which
  the tolerance leaves room for.
`test_parity_check_detects_a_different_run` shows the gradient norm and LoRA checks fail for a
run whose LoRA alpha differs by 1% (measured: gradient norm 1e-2, LoRA 1.4e-3 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcog.config import config_from_dict
from fastcog.trainer import train
from fastcog.variants import VARIANTS
from tests.test_trainer import make_cfg, read_metrics

STEPS = 20
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 2e-5
LORA_RTOL = 1e-4
KERNELS = {"lora_kernel": True, "fused_loss": True, "attention": "sdpa"}
# Every variant runs the kernels (interpreted: about 0.5 s a step, the cost of this file).
# Checkpointing policies and compile do not depend on the variant; they run on the one with
# the most special cases (1.5 I2V: frame padding, ofs, image latents), kernels off where the
# kernels add nothing to what is tested.
POLICY_CASES = {
    "none": ({"attention": "sdpa"}, "none"),
    "full": ({"attention": "sdpa"}, "full"),
    "selective": ({"attention": "sdpa"}, "selective"),
    "auto": ({"attention": "sdpa"}, "auto"),
    "compile-none": ({"compile": True}, "none"),
    "compile-selective": ({"attention": "sdpa", "compile": True}, "selective"),
    "kernels-compile-full": ({**KERNELS, "compile": True}, "full"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from fastcog.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("fast_clips")
    make_synthetic_dataset(root, num_clips=4, num_frames=9, height=64, width=96, seed=0, with_images=True)
    return root


Run = tuple[list[float], list[float], dict]  # per-step losses, per-step grad norms, final LoRA


def run(model: Path, clips: Path, out: Path, fast: dict, policy: str, **extra) -> Run:
    cfg = make_cfg(model, clips, out, fast=fast,
                   train={"train_steps": STEPS, "batch_size": 1, "activation_checkpointing": policy},
                   optim={"lr": 1e-3, "lr_warmup_steps": 2}, checkpoint={"every_steps": 0}, **extra)
    train(cfg)
    rows = read_metrics(out)
    return ([r["loss"] for r in rows], [r["grad_norm"] for r in rows],
            load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clips, tmp_path_factory):
    runs: dict[str, Run] = {}

    def get(variant: str) -> Run:
        if variant not in runs:
            out = tmp_path_factory.mktemp("ref") / variant
            runs[variant] = run(tiny_checkpoint(variant), clips, out, {}, "full")
        return runs[variant]

    return get


def step_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def lora_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def assert_parity(ref: Run, fast: Run) -> None:
    assert all(torch.isfinite(torch.tensor(fast[0])))
    assert step_gap(ref[0], fast[0]) <= LOSS_RTOL, (ref[0], fast[0])
    assert step_gap(ref[1], fast[1]) <= GRAD_NORM_RTOL, (ref[1], fast[1])
    assert lora_gap(ref[2], fast[2]) <= LORA_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_match_reference(variant, tiny_checkpoint, clips, reference, tmp_path):
    """Fused LoRA, fused loss, fastcog attention and selective checkpointing together."""
    assert_parity(reference(variant), run(tiny_checkpoint(variant), clips, tmp_path / "fast", KERNELS, "selective"))


@pytest.mark.slow
@pytest.mark.parametrize("case", POLICY_CASES)
def test_every_checkpointing_policy_matches_reference(case, tiny_checkpoint, clips, reference, tmp_path):
    fast, policy = POLICY_CASES[case]
    variant = "cogvideox1.5-5b-i2v"  # the variant with the most special cases
    assert_parity(reference(variant), run(tiny_checkpoint(variant), clips, tmp_path / "fast", fast, policy))


def test_parity_check_detects_a_different_run(tiny_checkpoint, clips, reference, tmp_path):
    """The tolerances are tight enough to catch a LoRA scale 1% off."""
    variant = "cogvideox-5b"
    other = run(tiny_checkpoint(variant), clips, tmp_path / "other", KERNELS, "none",
                lora={"rank": 4, "alpha": 8.08})
    assert step_gap(reference(variant)[1], other[1]) > GRAD_NORM_RTOL
    assert lora_gap(reference(variant)[2], other[2]) > LORA_RTOL


def test_all_switches_off_is_the_reference_model(tiny_checkpoint):
    """fast: {} leaves diffusers' processors and diffusers' gradient checkpointing in place."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from fastcog.build import load_transformer, parallelize_model

    cfg = config_from_dict({"model": {"path": str(tiny_checkpoint("cogvideox-5b")), "dtype": "fp32"},
                            "data": {"data_root": "unused"}, "lora": {"rank": 4}})
    model = parallelize_model(load_transformer(cfg, torch.device("cpu")), cfg, torch.device("cpu"),
                              tokens_per_sample=72).par.module
    assert model.gradient_checkpointing
    assert all(type(b.attn1.processor) is CogVideoXAttnProcessor2_0 for b in model.transformer_blocks)
    assert all("forward" not in vars(m) for m in model.modules())  # no patched forwards
