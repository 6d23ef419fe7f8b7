"""What every path shares (Bench): the transformer architecture, the training scheduler, the I2V
VAE, the seeded input batches, and quiet_to for moving diffusers models."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import read_checkpoint_config

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config
    from fastcog.variants import VariantSpec



# --------------------------------------------------------------------------------------------
# Shared inputs: architecture, scheduler, VAE, batches
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything every path shares."""

    device: torch.device
    variant: VariantSpec
    transformer_config: dict[str, Any]
    arch_source: str
    checkpoint: Path | None
    tiny: bool
    dtype: str
    seed: int
    warmup: int
    total_steps: int
    """The LR schedule's length in every path: warm-up + the longest path's timed steps, or the reused
    reference's (--reference-from)."""
    latent_shape: tuple[int, ...]
    """Per sample, [C, F, H, W]."""
    video_tokens: int
    text_tokens: int
    flops_per_sample: float
    peak_flops: float | None
    scheduler: Any
    vae: Any
    batches: list[dict[str, torch.Tensor]]
    lora_b_init: str
    init_lora: dict[str, torch.Tensor] | None = None
    ref_final_lora: dict[str, torch.Tensor] | None = None


def transformer_arch(args: argparse.Namespace, cfg: Config, variant: str, tiny: bool) -> tuple[dict, str]:
    from fastcog.models import tiny_transformer_config
    from fastcog.variants import FULL_TRANSFORMER_CONFIGS

    d = cfg.data
    if args.checkpoint is not None:
        return read_checkpoint_config(args.checkpoint), f"checkpoint {args.checkpoint}"
    if tiny:
        return tiny_transformer_config(variant, d.height, d.width, d.num_frames), "random init, tiny architecture"
    return dict(FULL_TRANSFORMER_CONFIGS[variant]), "random init, the variant's real architecture"


def make_scheduler(variant: str, checkpoint: Path | None) -> Any:
    """The training scheduler exactly as fastcog.models.make_tiny writes it (or the checkpoint's)."""
    from diffusers import CogVideoXDPMScheduler

    from fastcog.variants import SNR_SHIFT_SCALE

    if checkpoint is not None and (checkpoint / "scheduler").is_dir():
        return CogVideoXDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    return CogVideoXDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=SNR_SHIFT_SCALE.get(variant, 1.0), timestep_spacing="trailing",
    )


def make_vae(variant: VariantSpec, cfg: Config, checkpoint: Path | None, tiny: bool, device: torch.device,
             seed: int) -> Any:
    """I2V encodes the conditioning image every step, so its VAE is part of the step: the checkpoint's,
    else random weights of the real architecture (tiny: make_tiny's), in the compute dtype."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from fastcog.models import TORCH_DTYPES, set_vae_memory_options, tiny_vae_config
    from fastcog.variants import INVERT_SCALE_LATENTS, VAE_SCALING

    dtype = TORCH_DTYPES[cfg.model.dtype]
    if checkpoint is not None and (checkpoint / "vae").is_dir():
        vae = AutoencoderKLCogVideoX.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype)
    else:
        torch.manual_seed(seed + 2)
        scale = dict(scaling_factor=VAE_SCALING.get(variant.name, 0.7),
                     invert_scale_latents=variant.name in INVERT_SCALE_LATENTS)
        if tiny:
            vae = AutoencoderKLCogVideoX(**tiny_vae_config(variant.name))
        else:
            vae = AutoencoderKLCogVideoX(**scale)  # the released VAEs' structure and tile size
    set_vae_memory_options(vae, cfg.data.vae_slicing, cfg.data.vae_tiling)
    return quiet_to(vae, device=device, dtype=dtype).requires_grad_(False).eval()


def make_batches(n: int, batch: int, latent_shape: tuple[int, ...], text_shape: tuple[int, int],
                 pixels: tuple[int, int], is_i2v: bool, dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor]]:
    """n random batches on the host (scaled latents and T5 embeddings are about unit variance)."""
    import torch

    g = torch.Generator().manual_seed(seed + 3)
    out = []
    for _ in range(n):
        b = {"latents": torch.randn(batch, *latent_shape, generator=g).to(dtype),
             "prompt_embeds": torch.randn(batch, *text_shape, generator=g).to(dtype)}
        if is_i2v:
            b["images"] = torch.rand(batch, 3, *pixels, generator=g) * 2 - 1  # fp32, as the reference
        out.append(b)
    return out


def setup_bench(args: argparse.Namespace, cfg: Config, variant_name: str, tiny: bool, device: torch.device,
                max_steps: int, warmup: int) -> Bench:
    """max_steps: the LR schedule's length after the warm-up, at least the most timed steps of any path
    (each path takes its batches from the start)."""
    from fastcog.config import validate_for_variant
    from fastcog.flops import peak_flops, transformer_flops_per_sample, video_tokens
    from fastcog.models import TORCH_DTYPES
    from fastcog.variants import VAE_SPATIAL_FACTOR, detect_variant

    tcfg, source = transformer_arch(args, cfg, variant_name, tiny)
    variant = detect_variant(tcfg)
    validate_for_variant(cfg, variant)
    d = cfg.data
    temporal = variant.temporal_compression_ratio
    latent_shape = (variant.latent_channels, (d.num_frames - 1) // temporal + 1, d.height // VAE_SPATIAL_FACTOR,
                    d.width // VAE_SPATIAL_FACTOR)
    tokens = video_tokens(latent_shape, variant)
    text_shape = (variant.max_text_seq_length, variant.text_embed_dim)
    total = warmup + max_steps
    return Bench(
        device=device, variant=variant, transformer_config=tcfg, arch_source=source, checkpoint=args.checkpoint,
        tiny=tiny, dtype=cfg.model.dtype, seed=cfg.train.seed, warmup=warmup, total_steps=total,
        latent_shape=latent_shape, video_tokens=tokens, text_tokens=variant.max_text_seq_length,
        flops_per_sample=transformer_flops_per_sample(tcfg, tokens, cfg.lora.rank, cfg.lora.target_modules, False),
        peak_flops=peak_flops(device), scheduler=make_scheduler(variant.name, args.checkpoint),
        vae=make_vae(variant, cfg, args.checkpoint, tiny, device, cfg.train.seed) if variant.is_i2v else None,
        batches=make_batches(total, cfg.train.batch_size, latent_shape, text_shape, (d.height, d.width),
                             variant.is_i2v, TORCH_DTYPES[cfg.model.dtype], cfg.train.seed),
        lora_b_init=args.lora_b_init,
    )


def quiet_to(module: Any, **kwargs: Any) -> Any:
    """module.to(...) without diffusers' "keep modules in float32" advice, which is about
    from_pretrained and warns even when the model has no such module."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(**kwargs)
    finally:
        diffusers_logging.set_verbosity(level)
