"""Fused diffusion objective kernels: forward noising and the v-prediction MSE loss.

Math (docs/reference.md, objective steps 4 and 8), per sample b with abar = alphas_cumprod[t_b]::

    add_noise          x_t = sqrt(abar) z0 + sqrt(1 - abar) eps
    velocity_mse_loss  z0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat
                       w      = 1 / (1 - abar)
                       L      = (1/B) sum_b (1/N) sum_n w_b (z0_hat - z0)^2
    backward           dL/dv_hat = g * (-2 w_b sqrt(1 - abar_b) / (B N)) * (z0_hat - z0)

Shapes: latents, noise, model_output, noisy_latents ``[B, ...]`` (N = elements per sample),
timesteps integer ``[B]``, alphas_cumprod float64 or float32 ``[T]`` (T = 1000). The loss
is a 0-dim fp32 tensor.

Numerics. The per-sample coefficients are computed in fp64 inside the kernel, straight from
alphas_cumprod: at t = 0 abar ~ 0.9991 so 1 - abar ~ 9e-4 and w ~ 1.1e3; in fp32 (let alone
in the latent dtype, as diffusers does) 1 - abar would carry a relative error of ~1e-4. They
are then rounded to fp32 for the elementwise work (fp32 loads, fp32 arithmetic). At t = 999
abar = 0 exactly, so w = 1 and sqrt(abar) = 0 (no special case needed). The weight w is
applied to each block's sum of squares rather than to every element.

Determinism. Two stages, no atomics: every program writes ``w_b * sum(d^2)`` over its block
into its own slot of a partials buffer; a single program then sums the partials in a fixed
order (fp64 accumulator) and scales by 1 / (B N). The same inputs give bit-identical losses.
Backward recomputes d from the three inputs in one elementwise pass (reads 3, writes 1) rather
than saving a full-size fp32 temporary from the forward.

Block sizes: BLOCK = 2048 elements per program for the elementwise / partial-sum kernels,
1024 for the final reduction (one fixed choice, also under the interpreter; a fixed size
keeps the partial layout, hence the bits of the loss, independent of tuning). Chosen, not
swept.

Layers: ``_*_kernel`` (Triton) -> ``launch_*`` (launchers) -> custom ops with fake impls and
registered autograd (torch.compile traces through without a graph break) -> public functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import UPCAST, check_device, empty, to_out_dtype

__all__ = ["add_noise", "velocity_mse_loss"]

BLOCK = 2048
BLOCK_FINAL = 1024
NUM_WARPS = 8


# --------------------------------------------------------------------------- kernels


@triton.jit
def _coefficients(t_ptr, abar_ptr, b):
    """fp64 sqrt(abar), sqrt(1 - abar), 1 / (1 - abar) for sample b."""
    t = tl.load(t_ptr + b)
    abar = tl.load(abar_ptr + t).to(tl.float64)
    one_minus = 1.0 - abar
    return tl.sqrt(abar), tl.sqrt(one_minus), 1.0 / one_minus


@triton.jit
def _add_noise_kernel(
    z0_ptr, eps_ptr, out_ptr, t_ptr, abar_ptr, N,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    c_x, c_e, _ = _coefficients(t_ptr, abar_ptr, b)
    c_x = c_x.to(tl.float32)
    c_e = c_e.to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    z0 = tl.load(z0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x_t = c_x * z0 + c_e * eps
    tl.store(out_ptr + base + offs, to_out_dtype(x_t, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _residual(v_ptr, xt_ptr, z0_ptr, base, offs, mask, c_x, c_v):
    """z0_hat - z0 = sqrt(abar) x_t - sqrt(1-abar) v - z0 for one block, in fp32 (0 on masked lanes).

    Shared by the forward (sum of squares) and the backward (gradient), so both use one formula.
    """
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    z0 = tl.load(z0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return c_x.to(tl.float32) * x_t - c_v.to(tl.float32) * v - z0


@triton.jit
def _vmse_partial_kernel(
    v_ptr, xt_ptr, z0_ptr, t_ptr, abar_ptr, partial_ptr, N,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """partial[b, pid] = w_b * sum over this block of (sqrt(abar) x_t - sqrt(1-abar) v - z0)^2."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    c_x, c_v, w = _coefficients(t_ptr, abar_ptr, b)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    d = _residual(v_ptr, xt_ptr, z0_ptr, base, offs, mask, c_x, c_v)
    sq = tl.sum(d * d, axis=0)
    tl.store(partial_ptr + b * tl.num_programs(0) + pid, (w * sq.to(tl.float64)).to(tl.float32))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, P, inv_count, BLOCK: tl.constexpr):
    """out = inv_count * sum(partial[0:P]); one program, fixed order -> deterministic."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < P, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0) * inv_count
    tl.store(out_ptr, total.to(tl.float32))


@triton.jit
def _vmse_backward_kernel(
    g_ptr, v_ptr, xt_ptr, z0_ptr, t_ptr, abar_ptr, grad_ptr, N, inv_count,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    c_x, c_v, w = _coefficients(t_ptr, abar_ptr, b)
    g = tl.load(g_ptr).to(tl.float64)  # upstream grad read on device: no host sync
    coef = (-2.0 * inv_count * g * w * c_v).to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    d = _residual(v_ptr, xt_ptr, z0_ptr, base, offs, mask, c_x, c_v)
    tl.store(grad_ptr + base + offs, to_out_dtype(coef * d, grad_ptr.dtype.element_ty, UPCAST), mask=mask)


# --------------------------------------------------------------------------- launchers


def _prepare(
    ref: torch.Tensor, others: tuple[torch.Tensor, ...], timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[int, int, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Validate; flatten each sample to N contiguous elements; put t and abar on ref's device."""
    if ref.dim() < 1 or any(o.shape != ref.shape for o in others):
        raise ValueError(f"shapes differ: {[tuple(t.shape) for t in (ref, *others)]}")
    batch = ref.shape[0]
    if timesteps.shape != (batch,):
        raise ValueError(f"timesteps must be [B] = [{batch}], got {tuple(timesteps.shape)}")
    if timesteps.dtype.is_floating_point or alphas_cumprod.dim() != 1:
        raise ValueError("timesteps must be integer [B] and alphas_cumprod 1-D")
    check_device(ref, *others)
    # The scheduler keeps alphas_cumprod on the CPU: keep a device copy to avoid this H2D copy.
    timesteps = timesteps.to(ref.device)
    alphas_cumprod = alphas_cumprod.to(ref.device)
    n = ref.numel() // batch if batch else 0
    flat = tuple(t.contiguous() for t in (ref, *others))  # no copy when already contiguous
    return batch, n, flat, timesteps, alphas_cumprod


def launch_add_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, n, (z0, eps), t, abar = _prepare(latents, (noise,), timesteps, alphas_cumprod)
    if out is None:
        out = empty(tuple(latents.shape), dtype=latents.dtype, device=latents.device)
    assert out.is_contiguous() and out.shape == latents.shape
    if out.numel():
        grid = (triton.cdiv(n, BLOCK), batch)
        _add_noise_kernel[grid](z0, eps, out, t, abar, n, UPCAST=UPCAST, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def launch_velocity_mse_loss(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    batch, n, (v, x_t, z0), t, abar = _prepare(
        model_output, (noisy_latents, latents), timesteps, alphas_cumprod
    )
    if batch * n == 0:
        raise ValueError("velocity_mse_loss of an empty tensor")
    blocks = triton.cdiv(n, BLOCK)
    partials = empty((batch, blocks), dtype=torch.float32, device=v.device)
    _vmse_partial_kernel[(blocks, batch)](
        v, x_t, z0, t, abar, partials, n, UPCAST=UPCAST, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    loss = empty((), dtype=torch.float32, device=v.device)
    _sum_partials_kernel[(1,)](partials, loss, batch * blocks, 1.0 / (batch * n), BLOCK=BLOCK_FINAL)
    return loss


def launch_velocity_mse_loss_backward(
    grad_loss: torch.Tensor,
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, n, (v, x_t, z0), t, abar = _prepare(
        model_output, (noisy_latents, latents), timesteps, alphas_cumprod
    )
    if out is None:
        out = empty(tuple(v.shape), dtype=v.dtype, device=v.device)
    assert out.is_contiguous() and out.shape == v.shape
    g = grad_loss.to(device=v.device, dtype=torch.float32).reshape(())
    _vmse_backward_kernel[(triton.cdiv(n, BLOCK), batch)](
        g, v, x_t, z0, t, abar, out, n, 1.0 / (batch * n), UPCAST=UPCAST, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return out


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op(
    "fastcog::add_noise",
    mutates_args=(),
    schema="(Tensor latents, Tensor noise, Tensor timesteps, Tensor alphas_cumprod) -> Tensor",
)
def _add_noise_op(latents, noise, timesteps, alphas_cumprod):
    return launch_add_noise(latents, noise, timesteps, alphas_cumprod)


@_add_noise_op.register_fake
def _(latents, noise, timesteps, alphas_cumprod):
    return torch.empty_like(latents, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "fastcog::velocity_mse_loss_fwd",
    mutates_args=(),
    schema="(Tensor model_output, Tensor noisy_latents, Tensor latents, Tensor timesteps,"
    " Tensor alphas_cumprod) -> Tensor",
)
def _vmse_fwd_op(model_output, noisy_latents, latents, timesteps, alphas_cumprod):
    return launch_velocity_mse_loss(model_output, noisy_latents, latents, timesteps, alphas_cumprod)


@_vmse_fwd_op.register_fake
def _(model_output, noisy_latents, latents, timesteps, alphas_cumprod):
    return model_output.new_empty((), dtype=torch.float32)


@torch.library.custom_op(
    "fastcog::velocity_mse_loss_bwd",
    mutates_args=(),
    schema="(Tensor grad_loss, Tensor model_output, Tensor noisy_latents, Tensor latents,"
    " Tensor timesteps, Tensor alphas_cumprod) -> Tensor",
)
def _vmse_bwd_op(grad_loss, model_output, noisy_latents, latents, timesteps, alphas_cumprod):
    return launch_velocity_mse_loss_backward(
        grad_loss, model_output, noisy_latents, latents, timesteps, alphas_cumprod
    )


@_vmse_bwd_op.register_fake
def _(grad_loss, model_output, noisy_latents, latents, timesteps, alphas_cumprod):
    return torch.empty_like(model_output, memory_format=torch.contiguous_format)


def _vmse_setup_context(ctx, inputs, output) -> None:
    # Only references to tensors that exist anyway (inputs); nothing new is kept alive.
    ctx.save_for_backward(*inputs)


def _vmse_backward(ctx, grad_loss):
    model_output, noisy_latents, latents, timesteps, alphas_cumprod = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _vmse_bwd_op(grad_loss, model_output, noisy_latents, latents, timesteps, alphas_cumprod)
    # Differentiable in model_output only (the objective never needs the others).
    return grad, None, None, None, None


_vmse_fwd_op.register_autograd(_vmse_backward, setup_context=_vmse_setup_context)


# --------------------------------------------------------------------------- public functions


def add_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) * latents + sqrt(1 - abar_t) * noise`` per sample, one pass.

    latents, noise ``[B, ...]`` (fp32 / bf16 / fp16, same shape); timesteps integer ``[B]``;
    alphas_cumprod ``[T]`` float64 or float32. Returns x_t in latents' dtype (contiguous),
    computed in fp32 with fp64 coefficients. Not differentiable (it noises data).
    """
    return _add_noise_op(latents, noise, timesteps, alphas_cumprod)


def velocity_mse_loss(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The CogVideoX v-prediction loss, fused: a 0-dim fp32 tensor.

    ``mean_b(mean_n(w_b (sqrt(abar_b) x_t - sqrt(1 - abar_b) v_hat - z0)^2))`` with
    ``w_b = 1 / (1 - abar_b)``, model_output = v_hat, noisy_latents = x_t, latents = z0, all
    ``[B, ...]``. fp32 accumulation, deterministic two-stage reduction; differentiable in
    model_output (one fused backward pass), not in the other inputs.
    """
    return _vmse_fwd_op(model_output, noisy_latents, latents, timesteps, alphas_cumprod)
