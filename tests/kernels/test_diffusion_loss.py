"""Parity of fastcog.kernels.add_noise / velocity_mse_loss against the reference formulas.

Ground truth: the reference formulas in float64 on the same (rounded) inputs. The loss is an
fp32 output computed with fp32 accumulation whatever the input dtype, so it is held to the
fp32 bound; add_noise's output and the loss gradient are in the input dtype and held to that
dtype's bound (TOLERANCES). Timesteps always include 0 (abar ~ 0.999, w ~ 1e3, the hard case)
and 999 (abar = 0, w = 1).
"""

from __future__ import annotations

import pytest
import torch
from fastcog.kernels import add_noise, velocity_mse_loss
from fastcog.kernels.reference import (
    add_noise_reference,
    add_noise_reference_fp64,
    cogvideox_alphas_cumprod,
    velocity_mse_loss_reference,
    velocity_mse_loss_reference_fp64,
)

from . import DTYPE_IDS, DTYPES, assert_parity, device, poisoned_allocations

# shift 3.0 (CogVideoX-2B) and 1.0 (no shift: abar[0] = 0.99915, w[0] ~ 1.2e3)
SCHEDULES = {"shift3": cogvideox_alphas_cumprod(3.0), "shift1": cogvideox_alphas_cumprod(1.0)}

# Odd per-sample sizes (N = 420, 11232 = 5.5 blocks, 1, 2048 = exactly one block, 2049).
CPU_SHAPES = [(3, 3, 4, 5, 7), (2, 13, 16, 6, 9), (4, 1), (2, 2048), (3, 2049)]


def _inputs(shape, dtype, schedule="shift1", abar_dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = device()
    batch = shape[0]
    z0 = torch.randn(shape, generator=g).to(dtype).to(dev)
    eps = torch.randn(shape, generator=g).to(dtype).to(dev)
    v = torch.randn(shape, generator=g).to(dtype).to(dev)
    t = torch.randint(1, 999, (batch,), generator=g)
    t[0] = 0
    if batch > 1:
        t[1] = 999
    abar = SCHEDULES[schedule].to(abar_dtype).to(dev)
    return z0, eps, v, t.to(dev), abar


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_noise_parity(shape, dtype):
    z0, eps, _, t, abar = _inputs(shape, dtype)
    with poisoned_allocations():
        x_t = add_noise(z0, eps, t, abar)
    assert x_t.dtype == dtype and x_t.shape == z0.shape
    assert_parity(
        "x_t", x_t, add_noise_reference_fp64(z0, eps, t, abar), add_noise_reference(z0, eps, t, abar)
    )


def _loss_parity(shape, dtype, schedule="shift1", abar_dtype=torch.float64, upstream=1.0):
    z0, eps, v, t, abar = _inputs(shape, dtype, schedule, abar_dtype)
    x_t = add_noise_reference(z0, eps, t, abar)  # any x_t will do; use the reference's
    v = v.requires_grad_(True)
    with poisoned_allocations():
        loss = velocity_mse_loss(v, x_t, z0, t, abar)
        (loss * upstream).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0

    v64 = v.detach().double().requires_grad_(True)
    loss64 = velocity_mse_loss_reference_fp64(v64, x_t, z0, t, abar)
    (loss64 * upstream).backward()
    vlp = v.detach().clone().requires_grad_(True)
    loss_lp = velocity_mse_loss_reference(vlp, x_t, z0, t, abar)
    (loss_lp * upstream).backward()

    # The loss is computed in fp32 from the (rounded) inputs: fp32 bound for every input dtype.
    assert_parity("loss", loss.reshape(1), loss64.reshape(1), dtype=torch.float32)
    assert_parity("dL/dv", v.grad, v64.grad, vlp.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_velocity_mse_loss_parity(shape, dtype):
    _loss_parity(shape, dtype)


@pytest.mark.parametrize("schedule", ["shift3", "shift1"])
@pytest.mark.parametrize("abar_dtype", [torch.float64, torch.float32], ids=["abar64", "abar32"])
def test_velocity_mse_loss_schedules(schedule, abar_dtype):
    """Both schedules, alphas_cumprod in float64 or float32, a non-unit upstream gradient."""
    _loss_parity((3, 2, 5, 7), torch.bfloat16, schedule, abar_dtype, upstream=3.7)


def test_extreme_timesteps():
    """t = 0 everywhere (largest weight) and t = 999 everywhere (abar = 0: x_t = eps, w = 1)."""
    for fill in (0, 999):
        z0, eps, v, _, abar = _inputs((2, 3, 4, 5), torch.float32)
        t = torch.full((2,), fill, dtype=torch.int64, device=z0.device)
        x_t = add_noise(z0, eps, t, abar)
        assert_parity("x_t", x_t, add_noise_reference_fp64(z0, eps, t, abar))
        if fill == 999:
            assert torch.equal(x_t, eps)
        v = v.requires_grad_(True)
        loss = velocity_mse_loss(v, x_t, z0, t, abar)
        loss.backward()
        v64 = v.detach().double().requires_grad_(True)
        loss64 = velocity_mse_loss_reference_fp64(v64, x_t, z0, t, abar)
        loss64.backward()
        assert_parity("loss", loss.reshape(1), loss64.reshape(1))
        assert_parity("dL/dv", v.grad, v64.grad)


def test_loss_equals_velocity_form():
    """Algebra check of the formula itself: with x_t from add_noise, the loss is the plain
    MSE between v_hat and v = sqrt(abar) eps - sqrt(1 - abar) z0 (docs/reference.md, objective step 8)."""
    z0, eps, v_hat, t, abar = _inputs((3, 4, 5, 6), torch.float32)
    x_t = add_noise(z0, eps, t, abar)
    ab = abar[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * eps.double() - (1 - ab).sqrt() * z0.double()
    expected = ((v_hat.double() - v) ** 2).mean()
    loss = velocity_mse_loss(v_hat, x_t, z0, t, abar)
    # x_t is rounded to fp32 and multiplied by w ~ 1e3 at t = 0: not an exact identity.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_deterministic_and_poisoned():
    """Same inputs -> bit-identical loss and gradient (two-stage reduction, no atomics)."""
    z0, eps, v, t, abar = _inputs((2, 13, 16, 6, 9), torch.bfloat16)
    x_t = add_noise(z0, eps, t, abar)
    results = []
    for _ in range(2):
        vv = v.detach().clone().requires_grad_(True)
        with poisoned_allocations():
            loss = velocity_mse_loss(vv, x_t, z0, t, abar)
            loss.backward()
        results.append((loss, vv.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_non_contiguous_inputs():
    z0, eps, v, t, abar = _inputs((2, 5, 3, 4, 7), torch.float32)
    # [B, C, F, H, W] cache layout permuted to [B, F, C, H, W] as the trainer does.
    z0p, epsp, vp = (a.permute(0, 2, 1, 3, 4) for a in (z0, eps, v))
    x_t = add_noise(z0p, epsp, t, abar)
    assert_parity("x_t", x_t, add_noise_reference_fp64(z0p, epsp, t, abar))
    vp = vp.detach().requires_grad_(True)
    loss = velocity_mse_loss(vp, x_t, z0p, t, abar)
    loss.backward()
    v64 = vp.detach().double().requires_grad_(True)
    loss64 = velocity_mse_loss_reference_fp64(v64, x_t, z0p, t, abar)
    loss64.backward()
    assert_parity("loss", loss.reshape(1), loss64.reshape(1))
    assert_parity("dL/dv", vp.grad, v64.grad)


def test_references_match_diffusers():
    """The references are the diffusers scheduler's own arithmetic, bit for bit."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.CogVideoXDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True, snr_shift_scale=3.0, prediction_type="v_prediction",
    )  # fmt: skip
    assert torch.equal(sched.alphas_cumprod, SCHEDULES["shift3"])
    for dtype in DTYPES:
        z0, eps, v, t, abar = _inputs((3, 2, 4, 5), dtype, "shift3", seed=1)
        z0, eps, v, t = z0.cpu(), eps.cpu(), v.cpu(), t.cpu()
        x_t = sched.add_noise(z0, eps, t)
        assert torch.equal(x_t, add_noise_reference(z0, eps, t, sched.alphas_cumprod))
        # CogVideo finetune compute_loss
        z0_hat = sched.get_velocity(v, x_t, t)
        w = 1 / (1 - sched.alphas_cumprod[t])
        while w.dim() < z0_hat.dim():
            w = w.unsqueeze(-1)
        loss = torch.mean((w * (z0_hat - z0) ** 2).reshape(3, -1), dim=1).mean()
        assert torch.equal(loss, velocity_mse_loss_reference(v, x_t, z0, t, sched.alphas_cumprod))


def test_input_errors():
    z0, eps, v, t, abar = _inputs((2, 3), torch.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        add_noise(z0, eps[:, :2], t, abar)
    with pytest.raises(ValueError, match="timesteps"):
        add_noise(z0, eps, t[:1], abar)


def test_torch_compile_fullgraph_single_graph():
    """add_noise + model + loss + backward under torch.compile(fullgraph=True): one graph."""
    z0, eps, v, t, abar = _inputs((2, 3, 4, 5), torch.float32)
    weight = torch.randn(5, 5, device=z0.device, requires_grad=True)

    def step(z0, eps, t, abar, weight):
        x_t = add_noise(z0, eps, t, abar)
        v_hat = x_t @ weight
        return velocity_mse_loss(v_hat, x_t, z0, t, abar)

    explanation = torch._dynamo.explain(step)(z0, eps, t, abar, weight)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation

    torch._dynamo.reset()
    loss_c = torch.compile(step, backend="aot_eager", fullgraph=True)(z0, eps, t, abar, weight)
    (g_c,) = torch.autograd.grad(loss_c, weight)
    loss_e = step(z0, eps, t, abar, weight)
    (g_e,) = torch.autograd.grad(loss_e, weight)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


# --------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 13, 16, 60, 90), (2, 13, 16, 60, 90), (1, 22, 16, 96, 170)])
def test_velocity_mse_loss_parity_gpu(shape, dtype):
    """49x480x720 latents ([1, 13, 16, 60, 90]), batch 2, and the 1.5 shape (81x768x1360)."""
    _loss_parity(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_noise_parity_gpu(dtype):
    test_add_noise_parity((2, 13, 16, 60, 90), dtype)


@pytest.mark.gpu
def test_deterministic_gpu():
    z0, eps, v, t, abar = _inputs((2, 13, 16, 60, 90), torch.bfloat16)
    x_t = add_noise(z0, eps, t, abar)
    losses = [velocity_mse_loss(v, x_t, z0, t, abar) for _ in range(5)]
    assert all(torch.equal(losses[0], other) for other in losses[1:])
