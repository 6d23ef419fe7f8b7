"""The fast path against the reference path on tiny checkpoints of every variant.

Model-level parity (docs/design.md, "Testing"): the same seed, data and schedule through the real
trainer, once as the reference runs it and once with fastcog's patches (Triton kernels, fastcog's
attention processor, each checkpointing policy, compile on and off); per-step losses, per-step
gradient norms and the final LoRA weights must agree.

Where the Triton code runs. Interpreted (TRITON_INTERPRET=1), a kernel step costs about 0.5 s, so
the kernels themselves run interpreted on one variant, INTERPRETED (the one with the most special
cases: 1.5 I2V, frame padding, ofs, image latents), in `test_kernels_match_reference`. Elsewhere (the
other variants, the compiled cases) the custom ops keep everything but the Triton launches, which
tests/eager_kernels.py replaces with plain PyTorch of the same contract: the ops, their fake
impls and autograd, the fused-LoRA patch and the fused loss stay under test there (the kernels'
own numerics are tests/kernels' subject).
`test_eager_launchers_match_the_kernels` checks that the stand-ins compute what the kernels do.

Compile. One case runs inductor (`INDUCTOR_CASE`: the fused custom ops and full checkpointing
inside an inductor graph); the other compiled cases use the `aot_eager` backend, which traces
the same graph through dynamo and AOTAutograd (fake impls, autograd, checkpointing) without
inductor's C++ code generation, the slow part on a CPU.

Steps and tolerances (fp32 everywhere, so the paths differ only by summation order):
* STEPS = 5: two warm-up steps and three at the full learning rate. The paths differ from step 1
  on (identical weights: kernels vs CPU GEMMs, a float64 vs fp32 loss), and the optimizer then
  carries the difference forward slowly (over 20 steps the loss gap grew from 1.1e-7 at step 1
  to ~3e-7): a wrong kernel or patch shows in step 1's loss or gradient norm, or in step 2's
  loss, and the 20 steps did not add a check. Measured at 5 steps (every variant and
  case): loss at most 1e-7, gradient norm 2e-7, LoRA 2.3e-6; the cases that only move
  checkpointing, and the aot_eager compiles, are bitwise equal to the reference.
* per-step loss: 2e-6 relative.
* per-step pre-clip gradient norm: 2e-5 relative.
* final LoRA weights: max |a - b| <= 1e-4 * max |a| (up to 1.6e-5 measured for a compiled case over 20 steps).
`test_parity_check_detects_a_different_run` shows that a run whose LoRA alpha is 1% off fails the
gradient norm and LoRA checks (measured at 5 steps: gradient norm 1.0e-2, LoRA 3.9e-4 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastcog.config import config_from_dict
from fastcog.trainer import train
from fastcog.variants import VARIANTS
from tests.eager_kernels import use_eager_kernels
from tests.runs import make_cfg, read_lora, read_metrics

STEPS = 5
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 2e-5
LORA_RTOL = 1e-4
KERNELS = {"lora_kernel": True, "fused_loss": True, "attention": "sdpa"}
INTERPRETED = "cogvideox1.5-5b-i2v"
# Checkpointing policies and compile do not depend on the variant; they run on INTERPRETED,
# kernels off where the kernels add nothing to what is tested.
POLICY_CASES = {
    "none": ({"attention": "sdpa"}, "none"),
    "full": ({"attention": "sdpa"}, "full"),
    "selective": ({"attention": "sdpa"}, "selective"),
    "offload": ({"attention": "sdpa"}, "offload"),
    "compile-offload": ({"attention": "sdpa", "compile": True}, "offload"),
    "compile-selective": ({"attention": "sdpa", "compile": True}, "selective"),
    "kernels-compile-full": ({**KERNELS, "compile": True}, "full"),
}
INDUCTOR_CASE = "kernels-compile-full"


Run = tuple[list[float], list[float], dict]  # per-step losses, per-step grad norms, final LoRA


def run(model: Path, clips: Path, out: Path, fast: dict, policy: str, **extra) -> Run:
    cfg = make_cfg(model, clips, out, fast=fast,
                   train={"train_steps": STEPS, "batch_size": 1, "activation_checkpointing": policy},
                   optim={"lr": 1e-3, "lr_warmup_steps": 2}, checkpoint={"every_steps": 0}, **extra)
    train(cfg)
    rows = read_metrics(out)
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], read_lora(out)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clips, tmp_path_factory):
    runs: dict[str, Run] = {}

    def get(variant: str) -> Run:
        if variant not in runs:
            out = tmp_path_factory.mktemp("ref") / variant
            runs[variant] = run(tiny_checkpoint(variant), clips, out, {}, "full")
        return runs[variant]

    return get


def compile_with(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """fast.compile's `block.compile(...)`, and `torch.compile(...)` of the block's forward under
    offload, use `backend` (fastcog leaves torch.compile's default, inductor)."""
    module_compile, function_compile = torch.nn.Module.compile, torch.compile

    def compile(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return module_compile(self, *args, **kwargs)

    def compile_function(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return function_compile(*args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    monkeypatch.setattr(torch, "compile", compile_function)
    torch._dynamo.reset()


def step_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def lora_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def assert_parity(ref: Run, fast: Run) -> None:
    assert all(torch.isfinite(torch.tensor(fast[0])))
    print(f"relative gaps: loss {step_gap(ref[0], fast[0]):.1e}, grad norm {step_gap(ref[1], fast[1]):.1e}, "
          f"LoRA {lora_gap(ref[2], fast[2]):.1e}")
    assert step_gap(ref[0], fast[0]) <= LOSS_RTOL, (ref[0], fast[0])
    assert step_gap(ref[1], fast[1]) <= GRAD_NORM_RTOL, (ref[1], fast[1])
    assert lora_gap(ref[2], fast[2]) <= LORA_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_match_reference(variant, tiny_checkpoint, clips, reference, tmp_path, monkeypatch):
    """Fused LoRA, fused loss, fastcog attention and selective checkpointing together (the Triton
    kernels interpreted on INTERPRETED, eager launchers under the same custom ops elsewhere)."""
    if variant != INTERPRETED:
        use_eager_kernels(monkeypatch)
    assert_parity(reference(variant), run(tiny_checkpoint(variant), clips, tmp_path / "fast", KERNELS, "selective"))


@pytest.mark.slow
@pytest.mark.parametrize("case", POLICY_CASES)
def test_every_checkpointing_policy_matches_reference(case, tiny_checkpoint, clips, reference, tmp_path,
                                                      monkeypatch):
    fast, policy = POLICY_CASES[case]
    if fast.get("compile"):
        compile_with(monkeypatch, "inductor" if case == INDUCTOR_CASE else "aot_eager")
        # Under compile the custom ops are opaque calls: the launchers inside them are
        # test_kernels_match_reference's subject (interpreted on this variant).
        use_eager_kernels(monkeypatch)
    assert_parity(reference(INTERPRETED), run(tiny_checkpoint(INTERPRETED), clips, tmp_path / "fast", fast, policy))


def test_parity_check_detects_a_different_run(tiny_checkpoint, clips, reference, tmp_path, monkeypatch):
    """The tolerances are tight enough to catch a LoRA scale 1% off."""
    use_eager_kernels(monkeypatch)
    variant = "cogvideox-5b"
    other = run(tiny_checkpoint(variant), clips, tmp_path / "other", KERNELS, "none",
                lora={"rank": 4, "alpha": 8.08})
    print(f"alpha 1% off: grad norm {step_gap(reference(variant)[1], other[1]):.1e}, "
          f"LoRA {lora_gap(reference(variant)[2], other[2]):.1e}")
    assert step_gap(reference(variant)[1], other[1]) > GRAD_NORM_RTOL
    assert lora_gap(reference(variant)[2], other[2]) > LORA_RTOL


def test_eager_launchers_match_the_kernels(monkeypatch):
    """tests/eager_kernels.py's stand-ins give what the interpreted kernels give, through the public ops,
    forward and backward, fp32 and bf16: the variants that use them are tested on the kernels' numbers."""
    from fastcog.kernels import lora_linear, velocity_mse_loss
    from fastcog.kernels.reference import cogvideox_alphas_cumprod

    abar = cogvideox_alphas_cumprod()
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(2, 37, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
        lora_a, lora_b = torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g)
        v, x_t, z0 = (torch.randn(2, 3, 4, 6, 9, generator=g).to(dtype) for _ in range(3))
        t = torch.tensor([3, 990])

        def both(x=x, w=w, b=b, lora_a=lora_a, lora_b=lora_b, v=v, x_t=x_t, z0=z0, t=t, dtype=dtype):
            leaves = [x.to(dtype), lora_a, lora_b, v]
            for leaf in leaves:
                leaf.requires_grad_()
            y = lora_linear(leaves[0], w.to(dtype), b.to(dtype), leaves[1], leaves[2], 0.5)
            loss = velocity_mse_loss(leaves[3], x_t, z0, t, abar)
            grads = torch.autograd.grad((y.float().square().mean(), loss), leaves)
            return [y.detach(), loss.detach(), *grads]

        kernels = both()
        with monkeypatch.context() as m:
            use_eager_kernels(m)
            eager = both()
        for name, a, e in zip(["y", "loss", "dx", "dA", "dB", "dv"], kernels, eager, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape, name
            torch.testing.assert_close(e.double(), a.double(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5, msg=f"{name} {dtype}")


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
