"""Shared helpers for the fastcog Triton kernels.

Two facts about the Triton CPU interpreter (TRITON_INTERPRET=1, the CPU test tier) shape
every kernel here:

* It stores bfloat16 as raw uint16 and does arithmetic on that storage, so bf16 arithmetic
  and ``tl.dot`` on bf16 tiles give wrong numbers. Kernels therefore take a constexpr
  ``UPCAST`` flag: when true (interpreted) every loaded tile is converted to fp32 before any
  arithmetic. On a GPU the flag is false and the compiled code is exactly the native path.
* Its fp32 -> bf16 conversion truncates (rounds toward zero) where the GPU rounds to
  nearest even. ``to_out_dtype`` rounds to nearest even by integer arithmetic when
  interpreted, so CPU parity numbers mean the same thing as GPU ones.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

if __package__ != "fastcog.kernels":  # see kernels/__init__.py: never register the ops twice
    raise ImportError(f"{__name__}: import the kernels as fastcog.kernels, not as {__package__!r}")

# Read once at import: TRITON_INTERPRET must be set before a @triton.jit kernel is defined.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Upcast loaded tiles to fp32 before arithmetic (see module docstring).
UPCAST: bool = INTERPRET

# Tests set this to True: every buffer a launcher allocates is then filled with NaN first, so
# an element a kernel forgets to write can never pass as a plausible value.
POISON_ALLOCATIONS: bool = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs, NaN-filled when POISON_ALLOCATIONS is set (tests)."""
    if POISON_ALLOCATIONS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(*tensors: torch.Tensor) -> None:
    """Fail loudly (never fall back silently) when a kernel cannot run on these tensors."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise RuntimeError(
            f"fastcog.kernels: tensor on {t.device} but the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before fastcog.kernels is imported to run them on CPU"
        )


@triton.jit
def _loop_bound_probe(out_ptr, n):
    acc = 0
    for i in range(tl.program_id(0), n):  # a loop bound computed in the kernel, as lora_linear has
        acc += i
    tl.store(out_ptr, acc)


def _check_interpreter() -> None:
    """Fail at import, with the fix, where this Triton's interpreter cannot run the kernels.

    Triton 3.6's interpreter turns a loop bound computed in the kernel into a Python int with
    ``int(array)`` on a 1-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"); Triton 3.7 squeezes first. Compiled (GPU) kernels are
    not affected. A probe launch is the honest test: it does not guess from version numbers.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 -- re-raised with the fix below
        import numpy

        raise ImportError(
            f"fastcog.kernels: the Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) cannot run "
            f"these kernels with numpy {numpy.__version__}: {e}. Install triton==3.7.1 (constraints.txt) "
            "or numpy<2.4."
        ) from e
    if int(out.item()) != 3:  # 0 + 1 + 2
        raise ImportError(f"fastcog.kernels: the Triton interpreter computed {out.item()} for 0+1+2")


if INTERPRET:
    _check_interpreter()


@triton.jit
def to_out_dtype(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Convert fp32 ``x`` to DTYPE with round-to-nearest-even on every backend."""
    if UPCAST and DTYPE == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16; round to nearest even by hand: add half an
        # ulp of bf16 (0x7FFF) plus the lowest kept bit (ties to even), keep the high 16 bits.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
