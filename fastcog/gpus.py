"""What fastcog knows about each GPU, in one table: memory, peak dense matmul rates, bandwidth.

Every figure is the vendor's datasheet value (dense, no sparsity), not a measurement: MFU is
computed against the bf16 peak, and `fastcog plan`'s step times derived from these rates are
estimates (lower bounds at peak rate) until a benchmark on that GPU replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    key: str
    """The `fastcog plan --gpu` name."""
    device_name: str
    """A substring of torch.cuda.get_device_name() that identifies it."""
    memory_bytes: int
    """Device memory as sold (GB = 1e9 bytes; the usable amount is slightly lower)."""
    bf16_flops: float
    """Peak dense bf16 tensor-core FLOP/s (fp32 accumulate)."""
    fp8_flops: float | None
    """Peak dense FP8 tensor-core FLOP/s; None where the GPU has no FP8 tensor cores."""
    hbm_bytes_per_s: float
    source: str


GPUS: tuple[GpuSpec, ...] = (
    # PCIe before SXM: the more specific device name must match first.
    GpuSpec("h100-pcie", "H100 PCIe", 80 * 10**9, 756e12, 1513e12, 2.0e12, "NVIDIA H100 datasheet (PCIe)"),
    GpuSpec("h100-80gb", "H100", 80 * 10**9, 989e12, 1979e12, 3.35e12, "NVIDIA H100 datasheet (SXM5)"),
    GpuSpec("h200", "H200", 141 * 10**9, 989e12, 1979e12, 4.8e12, "NVIDIA H200 datasheet (SXM)"),
    GpuSpec("a100-80gb", "A100-SXM4-80GB", 80 * 10**9, 312e12, None, 2.039e12, "NVIDIA A100 datasheet (SXM, 80 GB)"),
    GpuSpec("a100-40gb", "A100", 40 * 10**9, 312e12, None, 1.555e12, "NVIDIA A100 datasheet (SXM, 40 GB)"),
    GpuSpec("l40s", "L40S", 48 * 10**9, 362e12, 733e12, 0.864e12, "NVIDIA L40S datasheet"),
    GpuSpec("rtx4090", "RTX 4090", 24 * 10**9, 165.2e12, 330.3e12, 1.008e12,
            "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090, fp32 accumulate)"),
)

GPU_KEYS: tuple[str, ...] = tuple(g.key for g in GPUS)


def gpu_by_key(key: str) -> GpuSpec:
    for g in GPUS:
        if g.key == key:
            return g
    raise KeyError(key)


def gpu_by_device_name(name: str) -> GpuSpec | None:
    """The spec of a GPU named as torch.cuda.get_device_name() names it, or None when unknown."""
    for g in GPUS:
        if g.device_name in name:
            return g
    return None
