"""The training forward's autocast, for the estimates that run a block on fake tensors.

The transformer forward trains under autocast in the compute dtype (fastcog.objective), and what
autograd saves depends on it: the fp32 LoRA weights meet bf16 activations as bf16 copies, and on
CUDA layer norm runs in fp32, so its output, and the modulation after it, are saved in fp32. CPU
autocast keeps layer norm in bf16. An estimate must therefore run under the autocast of the
device that will train.

Where that device exists (the trainer's own estimate, on a GPU or a CPU), torch's autocast runs
with the fake tensors. A GPU run planned on a machine without one (`fastcog plan`) runs on the
meta device, which has no autocast: there `CudaAutocastRules` applies CUDA autocast's casts to
the functions a CogVideoX block calls, from torch's CUDA autocast op lists
(aten/src/ATen/autocast_mode.cpp): the matmul family and attention run in the compute dtype, the
fp32 list (layer norm, group norm, softmax, log, exp, ...) in fp32, everything else as its inputs
promote. Autocast casts only floating tensors of the compute dtypes (not fp64, not FP8). The
GPU tier compares the two on a real GPU (tests/test_plan.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# CUDA autocast's lower-precision list, as the Python functions a model calls.
_LOWER_PRECISION = frozenset({
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.prelu, F.scaled_dot_product_attention,
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.mv, torch.addmv,
    torch.einsum, torch.chain_matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm,
    torch.Tensor.bmm,
})
# CUDA autocast's fp32 list (with the ops it runs in fp32 when no dtype is given).
_FP32 = frozenset({
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.softplus, F.mse_loss, F.l1_loss, F.smooth_l1_loss,
    F.kl_div, F.cosine_similarity, F.binary_cross_entropy_with_logits,
    torch.layer_norm, torch.group_norm, torch.softmax, torch.log_softmax, torch.exp, torch.log, torch.rsqrt,
    torch.pow, torch.logsumexp, torch.cumsum, torch.prod, torch.sum, torch.Tensor.softmax,
    torch.Tensor.log_softmax, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.rsqrt, torch.Tensor.pow,
    torch.Tensor.sum,
})
_CAST_FROM = (torch.float16, torch.bfloat16, torch.float32)


class CudaAutocastRules(TorchFunctionMode):
    """CUDA autocast's casts, applied to the functions above (see the module docstring)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER_PRECISION:
            args, kwargs = _cast((args, kwargs), self.dtype)
        elif func in _FP32 and kwargs.get("dtype") is None:
            args, kwargs = _cast((args, kwargs), torch.float32)
        return func(*args, **kwargs)


def _cast(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.dtype in _CAST_FROM and tree.dtype != dtype else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast(x, dtype) for x in tree)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree


@contextlib.contextmanager
def training_autocast(device: torch.device, dtype: torch.dtype, cuda_rules: bool = False) -> Iterator[None]:
    """The forward's autocast in `dtype` on `device` (none for fp32): torch's own where the device
    exists, CUDA's rules on the meta device when `cuda_rules`."""
    if dtype == torch.float32:
        yield
    elif device.type == "meta":
        if not cuda_rules:
            raise ValueError("the meta device has no autocast: estimate with cuda_rules=True, or on a real device")
        with CudaAutocastRules(dtype):
            yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
