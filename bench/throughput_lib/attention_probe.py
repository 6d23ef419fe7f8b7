"""Which attention kernel a path actually ran, read from a torch.profiler trace of one warm-up step.

A path's configuration names a backend (or, for the reference, leaves the choice to SDPA); the
profile shows what ran: the dispatcher ops (``aten::_scaled_dot_product_flash_attention_for_cpu``,
``aten::_scaled_dot_product_cudnn_attention``, a flash-attn library's custom op, ...) and, on a GPU,
the CUDA kernels. A torch.compiled model calls the same aten ops through the dispatcher, so they
appear in its profile too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

OP_PATTERN = re.compile(r"scaled_dot_product|flash|efficient_attention|attention", re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa", re.IGNORECASE)
# A cuDNN kernel without an attention mark may be a convolution's (the patch embedding).
CONV_KERNEL = re.compile(r"conv|fprop|dgrad|wgrad", re.IGNORECASE)
GENERIC_OP = "aten::scaled_dot_product_attention"  # the entry point: what it dispatched to is the answer
TOP_KERNELS = 5
NO_WARMUP = "not recorded: no warm-up step"


def attention_profiler(device: torch.device) -> Any:
    """A torch.profiler context for one step: CPU ops, and CUDA kernels on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def attention_kernels(prof: Any) -> tuple[list[str], str]:
    """(the attention ops in call order, then the top CUDA kernels by device time; a one-line summary)."""
    ops: list[str] = []
    kernel_time: dict[str, float] = {}
    for name, on_gpu, _, duration in sorted(_events(prof), key=lambda e: e[2]):
        if not on_gpu:
            # Namespaced ops only; the autograd engine's node labels repeat the backward ops.
            if "::" in name and not name.startswith("autograd::") and OP_PATTERN.search(name) and name not in ops:
                ops.append(name)
        elif is_attention_kernel(name):
            kernel_time[name] = kernel_time.get(name, 0.0) + duration
    kernels = sorted(kernel_time, key=kernel_time.__getitem__, reverse=True)[:TOP_KERNELS]
    return ops + kernels, summary(ops, kernels)


def _events(prof: Any) -> list[tuple[str, bool, int, float]]:
    """(name, on a GPU, start, duration) of every event. The profiler's raw events: its FunctionEvent list
    (prof.events()) builds the call tree first, about 100x slower (0.3 s for one tiny-model step)."""
    from torch.autograd import DeviceType

    raw = getattr(getattr(prof.profiler, "kineto_results", None), "events", None)
    if raw is not None:
        return [(e.name(), e.device_type() == DeviceType.CUDA, e.start_ns(), e.duration_ns()) for e in raw()]
    return [(e.name, e.device_type == DeviceType.CUDA, e.time_range.start, e.time_range.elapsed_us())
            for e in prof.events()]


def is_attention_kernel(name: str) -> bool:
    return bool(ATTENTION_KERNEL.search(name)) or ("cudnn" in name.lower() and not CONV_KERNEL.search(name))


def summary(ops: list[str], kernels: list[str]) -> str:
    """The forward op(s) SDPA or the processor dispatched to, and on a GPU the busiest kernel."""
    forward = [op for op in ops if "backward" not in op.lower() and op != GENERIC_OP]
    if not forward:
        forward = [op for op in ops if "backward" not in op.lower()]
    if not forward and not kernels:
        return "no attention op seen in the profile"
    # The first forward op is the implementation SDPA chose; ops it calls in turn add nothing.
    text = forward[0] if forward else "no attention op seen on the CPU side"
    if kernels:
        top = kernels[0] if len(kernels[0]) <= 90 else kernels[0][:87] + "..."
        text += f"; kernel {top}"
    return text
