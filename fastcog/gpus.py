"""What fastcog knows about each GPU, in two tables: memory, peak dense matmul rates and bandwidth
(GPUS), and the published attention throughput of each backend (ATTENTION_RATES).

GPUS holds the vendor's datasheet values (dense, no sparsity), not measurements: MFU is computed
against the bf16 peak. ATTENTION_RATES holds figures read from published benchmarks, each with its
source and setting. `fastcog plan`'s step times and MFU derived from them are estimates until a
benchmark on that GPU (bench/throughput.py) replaces them.
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
    capability: tuple[int, int] | None = None
    """CUDA compute capability: what `fast.attention: auto` chooses by (fastcog.fast.attention)."""


GPUS: tuple[GpuSpec, ...] = (
    # PCIe before SXM: the more specific device name must match first.
    GpuSpec("h100-pcie", "H100 PCIe", 80 * 10**9, 756e12, 1513e12, 2.0e12, "NVIDIA H100 datasheet (PCIe)", (9, 0)),
    GpuSpec("h100-80gb", "H100", 80 * 10**9, 989e12, 1979e12, 3.35e12, "NVIDIA H100 datasheet (SXM5)", (9, 0)),
    GpuSpec("h200", "H200", 141 * 10**9, 989e12, 1979e12, 4.8e12, "NVIDIA H200 datasheet (SXM)", (9, 0)),
    GpuSpec("a100-80gb", "A100-SXM4-80GB", 80 * 10**9, 312e12, None, 2.039e12, "NVIDIA A100 datasheet (SXM, 80 GB)",
            (8, 0)),
    GpuSpec("a100-40gb", "A100", 40 * 10**9, 312e12, None, 1.555e12, "NVIDIA A100 datasheet (SXM, 40 GB)", (8, 0)),
    GpuSpec("l40s", "L40S", 48 * 10**9, 362e12, 733e12, 0.864e12, "NVIDIA L40S datasheet", (8, 9)),
    GpuSpec("rtx4090", "RTX 4090", 24 * 10**9, 165.2e12, 330.3e12, 1.008e12,
            "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090, fp32 accumulate)", (8, 9)),
)

GPU_KEYS: tuple[str, ...] = tuple(g.key for g in GPUS)


@dataclass(frozen=True)
class AttentionRate:
    """Published bf16 attention throughput of one backend on one GPU. The FlashAttention papers count
    FLOPs as fastcog.flops does (forward 4 * N^2 * D, backward 2.5x forward), so these rates divide
    fastcog's attention FLOPs directly."""

    forward_flops: float
    backward_flops: float
    source: str
    setting: str
    derived: str | None = None
    """How the figure was derived from what the source reports; None when it is read as reported."""


# The FlashAttention-3 paper's BF16 benchmark: H100 80GB SXM5, 16k tokens (batch 1 at hidden 2048, 32 heads),
# head dim 64 (CogVideoX's), no causal mask (CogVideoX attends bidirectionally), the longest length it reports
# and the nearest to CogVideoX-5B's ~17.8k. Values as labelled on its bar charts "Attention forward/backward
# speed, head dim 64 (H100 80GB SXM5)", read from a text transcription of the figures
# (subtext.edge.nugit.net image pages of the paper), not from the PDF itself.
_FA3_PAPER = "Shah et al., FlashAttention-3 (arXiv:2407.08608), BF16 benchmark figures"
_FA3_SETTING = "H100 80GB SXM5, bf16, head dim 64, 16k tokens, non-causal"
_H100 = {
    "fa3": AttentionRate(497e12, 474e12, _FA3_PAPER, _FA3_SETTING),
    "cudnn": AttentionRate(413e12, 433e12, _FA3_PAPER + " (the paper's cuDNN 9 baseline)", _FA3_SETTING),
    "flash_attn": AttentionRate(324e12, 291e12, _FA3_PAPER + " (the paper's FlashAttention-2 baseline)",
                                _FA3_SETTING),
    # SDPA's flash backend is FlashAttention-2 built into PyTorch (PyTorch 2.2 release notes): no separate figure.
    "flash": AttentionRate(324e12, 291e12, _FA3_PAPER + " (the paper's FlashAttention-2 baseline)", _FA3_SETTING,
                           "the flash-attn 2 figure: SDPA's flash kernel is FlashAttention-2 (PyTorch 2.2 notes)"),
    # SDPA's math backend is unfused matmul-softmax-matmul, what the paper's "standard attention" runs; that
    # ran out of memory at 16k, so its 8k figure.
    "math": AttentionRate(73e12, 95e12, _FA3_PAPER + " (the paper's standard attention baseline)",
                          "H100 80GB SXM5, bf16, head dim 64, 8k tokens, non-causal",
                          "the paper's standard (unfused PyTorch) attention at 8k, taken for SDPA's math backend"),
}

ATTENTION_RATES: dict[str, dict[str, AttentionRate]] = {"h100-80gb": _H100}
"""{GPU key: {backend: rate}} for the GPUs and backends a source reports. No source found gives the
memory-efficient SDPA kernel on any GPU, nor any backend on A100, L40S or RTX 4090 at head dim 64:
`fastcog plan` puts attention at the dense bf16 peak there and says so."""

ATTENTION_RATES_BY_PEAK: dict[str, str] = {"h200": "h100-80gb", "h100-pcie": "h100-80gb"}
"""GPUs of the same chip as one in ATTENTION_RATES but with no published figures of their own: its figures
scaled by the ratio of the two bf16 datasheet peaks (1 for the H200, whose peak is the H100 SXM5's) -- an
assumption, labelled as derived wherever used."""


def attention_rate(gpu: GpuSpec, backend: str) -> AttentionRate | None:
    """The published (or derived, see ATTENTION_RATES_BY_PEAK) rate of `backend` on `gpu`, or None."""
    if backend in ATTENTION_RATES.get(gpu.key, {}):
        return ATTENTION_RATES[gpu.key][backend]
    reference = ATTENTION_RATES_BY_PEAK.get(gpu.key)
    rate = ATTENTION_RATES.get(reference or "", {}).get(backend)
    if reference is None or rate is None:
        return None
    scale = gpu.bf16_flops / gpu_by_key(reference).bf16_flops
    how = f"the {reference} figure x {scale:.3g} (the ratio of the bf16 datasheet peaks)"
    return AttentionRate(rate.forward_flops * scale, rate.backward_flops * scale, rate.source, rate.setting,
                         how + (f", itself {rate.derived}" if rate.derived else ""))


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
