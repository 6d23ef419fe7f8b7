"""The FLOP model: model FLOPs per sample and per step, peak FLOP/s per GPU, MFU.

FLOP convention (docs/design.md): model FLOPs only, recompute not counted.
  linear forward      2 * N * P_lin          (P_lin: token-wise linear weights of the blocks)
  linear backward     2 * N * P_lin          activation grads only when the base is frozen;
                      + 2 * N * P_lin        weight grads as well for full fine-tuning
  attention forward   4 * N^2 * D * layers   (QK^T and PV, D = heads * head_dim)
  attention backward  2.5 x forward
  LoRA                2 * N * r * (in + out) per adapter forward, 2x that backward
The per-block AdaLN and timestep linears act once per sample, not per token, and are left out.
MFU = model FLOPs / (step time x peak dense bf16 FLOP/s of the GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fastcog.checkpoint import TrainState
from fastcog.config import Config
from fastcog.gpus import gpu_by_device_name
from fastcog.metrics import peak_memory_gb
from fastcog.parallel import World
from fastcog.variants import VariantSpec


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device (fastcog.gpus), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    spec = gpu_by_device_name(torch.cuda.get_device_name(device))
    return None if spec is None else spec.bf16_flops


ATTENTION_BACKWARD = 2.5
"""Attention's backward FLOPs per forward FLOP (the module docstring; the FlashAttention papers count the same)."""


@dataclass(frozen=True)
class ForwardFlops:
    """One sample's forward FLOPs by part (see the module docstring)."""

    linear: float
    attention: float
    lora: float


def forward_flops(transformer_config: Any, video_tokens: int, lora_rank: int | None,
                  lora_targets: tuple[str, ...] = ()) -> ForwardFlops:
    cfg = dict(transformer_config)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    dim = heads * head_dim
    n = video_tokens + cfg.get("max_text_seq_length", 226)
    ff_inner = 4 * dim  # diffusers FeedForward default mult=4
    linear_shapes = {"to_q": (dim, dim), "to_k": (dim, dim), "to_v": (dim, dim), "to_out.0": (dim, dim),
                     "ff.net.0.proj": (dim, ff_inner), "ff.net.2": (ff_inner, dim)}
    p_lin = layers * sum(i * o for i, o in linear_shapes.values())
    lora = 0.0
    if lora_rank:
        for target in lora_targets:
            shape = linear_shapes.get(target)
            if shape is not None:
                lora += 2 * n * lora_rank * (shape[0] + shape[1]) * layers
    return ForwardFlops(linear=2 * n * p_lin, attention=4 * n * n * dim * layers, lora=lora)


def transformer_flops_per_sample(
    transformer_config: Any,
    video_tokens: int,
    lora_rank: int | None,
    lora_targets: tuple[str, ...] = (),
    full_finetune: bool = False,
) -> float:
    """Model FLOPs of one forward + backward for one sample (see the module docstring)."""
    f = forward_flops(transformer_config, video_tokens, lora_rank, lora_targets)
    return float(f.linear * (3 if full_finetune else 2) + f.attention * (1 + ATTENTION_BACKWARD) + f.lora * 3)


# The forward parts each activation checkpointing policy runs again in backward: the whole forward
# (`full`, `offload`), or all of it but attention, whose outputs `selective` keeps.
RECOMPUTED_PARTS: dict[str, tuple[str, ...]] = {
    "none": (), "selective": ("linear", "lora"), "full": ("linear", "attention", "lora"),
    "offload": ("linear", "attention", "lora")}


def executed_flops_per_sample(transformer_config: Any, video_tokens: int, lora_rank: int | None,
                              lora_targets: tuple[str, ...] = (), full_finetune: bool = False,
                              policy: str = "none") -> float:
    """Model FLOPs plus what activation checkpointing recomputes in backward (RECOMPUTED_PARTS)."""
    f = forward_flops(transformer_config, video_tokens, lora_rank, lora_targets)
    recompute = sum(getattr(f, part) for part in RECOMPUTED_PARTS[policy])
    return transformer_flops_per_sample(transformer_config, video_tokens, lora_rank, lora_targets,
                                        full_finetune) + recompute


def attention_flops_per_sample(transformer_config: Any, video_tokens: int, policy: str = "none"
                               ) -> tuple[float, float]:
    """Of executed_flops_per_sample, attention's: (forward with its recompute, backward). They run at an
    attention kernel's rate, not the matmul peak."""
    forward = forward_flops(transformer_config, video_tokens, None).attention
    return forward * (1 + ("attention" in RECOMPUTED_PARTS[policy])), forward * ATTENTION_BACKWARD


def video_tokens(latent_shape: torch.Size, variant: VariantSpec) -> int:
    """Transformer video tokens for one sample with cached latents of shape [C, F, H, W]."""
    _, f, h, w = latent_shape
    if variant.patch_size_t:
        f = math.ceil(f / variant.patch_size_t)
    return f * (h // variant.patch_size) * (w // variant.patch_size)


@dataclass
class StepWork:
    """What one optimizer step computed, for the throughput metrics."""

    samples: int = 0
    video_tokens: int = 0
    flops: float = 0.0


class WorkCounter:
    """Model FLOPs and tokens of a micro-batch (buckets make them vary batch to batch)."""

    def __init__(self, transformer_config: Any, variant: VariantSpec, cfg: Config) -> None:
        self.config, self.variant, self.cfg = transformer_config, variant, cfg
        self._flops: dict[int, float] = {}

    def __call__(self, batch: dict[str, torch.Tensor], work: StepWork) -> None:
        latents = batch["latents"]
        tokens = video_tokens(latents.shape[1:], self.variant)
        if tokens not in self._flops:
            sft = self.cfg.model.training_type == "sft"
            self._flops[tokens] = transformer_flops_per_sample(
                self.config, tokens, None if sft else self.cfg.lora.rank, self.cfg.lora.target_modules, sft)
        work.samples += latents.shape[0]
        work.video_tokens += latents.shape[0] * tokens
        work.flops += latents.shape[0] * self._flops[tokens]


def step_metrics(state: TrainState, loss: float, grad_norm: float, lr: float, dt: float, work: StepWork,
                 world: World, peak: float | None, device: torch.device) -> dict[str, Any]:
    """One metrics.jsonl record. Throughput counts the global batch (every rank's slice has the
    same shape); tflops is the whole job's, mfu is per device."""
    n = world.world_size
    tflops = work.flops * n / dt / 1e12
    return {
        "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
        "samples_per_s": work.samples * n / dt, "tokens_per_s": work.video_tokens * n / dt,
        "tflops": tflops, "mfu": None if peak is None else tflops * 1e12 / (peak * n),
        "mem_peak_gb": peak_memory_gb(device),
    }
