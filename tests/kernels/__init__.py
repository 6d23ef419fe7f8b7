"""Parity suite for fastcog.kernels: the tolerance table and the comparison helpers.

Parity rule (docs/design.md, "Testing"): every kernel output is compared with a float64 ground
truth computed from the *same* (already rounded) inputs.

* fp32 outputs: relative error at most ``floor`` (1e-5, "tight").
* bf16 / fp16 outputs: relative error at most ``ratio`` x the error of plain PyTorch doing
  the same computation in the same low precision (the references in
  fastcog.kernels.reference), plus ``floor``, a small absolute allowance for cases where
  PyTorch happens to be nearly exact.

Errors are measured two ways, each against its own bound: the relative Frobenius norm of the
difference (the mean behaviour), and the largest elementwise error relative to the largest
element of the truth (catches one wrong tile or row that a norm could average away).
NaN/inf never passes: outputs must be finite, and comparisons with NaN are false.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    ratio: float  # allowed kernel error / low-precision PyTorch error (unused for fp32)
    floor: float  # absolute allowance on the relative error


# THE tolerance table. Keyed by the dtype of the output being checked.
TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float32: Tol(ratio=0.0, floor=1e-5),
    torch.bfloat16: Tol(ratio=2.0, floor=1e-4),
    torch.float16: Tol(ratio=2.0, floor=1e-5),
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _errors(value: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    diff = value.double() - truth
    scale_norm = truth.norm().item()
    scale_max = truth.abs().max().item()
    return diff.norm().item() / scale_norm, diff.abs().max().item() / scale_max


def assert_parity(
    name: str,
    value: torch.Tensor,
    truth: torch.Tensor,
    lowp: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Check ``value`` (kernel) against ``truth`` (fp64) under TOLERANCES[dtype].

    ``lowp`` is plain PyTorch's result in the same low precision (required for bf16/fp16).
    ``dtype`` defaults to value's dtype.
    """
    dtype = dtype or value.dtype
    tol = TOLERANCES[dtype]
    assert value.shape == truth.shape, f"{name}: shape {tuple(value.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(value).all(), f"{name}: non-finite values in the kernel output"
    assert torch.isfinite(truth).all() and truth.abs().max() > 0, f"{name}: degenerate ground truth"
    err_norm, err_max = _errors(value, truth)
    if dtype == torch.float32:
        bound_norm = bound_max = tol.floor
        base = ""
    else:
        assert lowp is not None, f"{name}: a low-precision PyTorch result is needed for {dtype}"
        ref_norm, ref_max = _errors(lowp, truth)
        bound_norm = tol.ratio * ref_norm + tol.floor
        bound_max = tol.ratio * ref_max + tol.floor
        base = f" (torch {dtype}: norm {ref_norm:.3e}, max {ref_max:.3e})"
    ok = err_norm <= bound_norm and err_max <= bound_max  # False for NaN
    assert ok, (
        f"{name} [{dtype}]: kernel rel. error norm {err_norm:.3e} (bound {bound_norm:.3e}), "
        f"max {err_max:.3e} (bound {bound_max:.3e}){base}"
    )


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every buffer the kernel launchers allocate is NaN-filled first (unwritten -> NaN)."""
    from fastcog.kernels import _common

    old = _common.POISON_ALLOCATIONS
    _common.POISON_ALLOCATIONS = True
    try:
        yield
    finally:
        _common.POISON_ALLOCATIONS = old


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
