"""Everything a run needs before its first step, checked before anything is written.

The model folder, the variant's config rules and every data file are checked first; then the
output directory is created (never over an earlier run's checkpoints); then the dataset is
encoded into the cache and the loop's components are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastcog.checkpoint import list_checkpoints, resolve_resume
from fastcog.config import Config, save_config, validate_for_variant
from fastcog.data.cache import CachedDataset, Encoder
from fastcog.data.listfile import Sample, read_dataset
from fastcog.data.prepare import cache_dir_for, prepare
from fastcog.errors import ConfigError
from fastcog.flops import video_tokens
from fastcog.models import TORCH_DTYPES, load_components, read_variant, set_vae_memory_options
from fastcog.parallel import SINGLE_PROCESS, World, barrier
from fastcog.variants import VariantSpec


def write_demo_data(cfg: Config, world: World = SINGLE_PROCESS) -> None:
    """The demo's tiny checkpoint (model.create_tiny) and synthetic clips (data.synthetic_clips),
    written by rank 0 when they do not exist yet; nothing for a real run."""
    from fastcog.data.synthetic import make_synthetic_dataset
    from fastcog.models import make_tiny

    d = cfg.data
    if world.is_main:
        if cfg.model.create_tiny and not Path(cfg.model.path).exists():
            make_tiny(cfg.model.create_tiny, cfg.model.path, seed=0, height=d.height, width=d.width,
                      frames=d.num_frames)
            print(f"wrote a tiny random {cfg.model.create_tiny} checkpoint to {cfg.model.path}")
        if d.synthetic_clips:
            make_synthetic_dataset(
                d.data_root, num_clips=d.synthetic_clips, num_frames=max(d.num_frames, 8), height=d.height,
                width=d.width, seed=cfg.train.seed, with_images=d.image_column is not None,
            )
    barrier()


def check_inputs(cfg: Config) -> tuple[VariantSpec, list[Sample]]:
    """Model folder, variant-specific config rules and every data file, before any output."""
    d = cfg.data
    variant = read_variant(cfg.model.path)
    validate_for_variant(cfg, variant)
    samples = read_dataset(d.data_root, metadata_file=d.metadata_file, caption_column=d.caption_column,
                           video_column=d.video_column, image_column=d.image_column)
    return variant, samples


def prepare_output_dir(cfg: Config, world: World = SINGLE_PROCESS) -> tuple[Path, Path | None]:
    """Create the output dir; refuse to overwrite an earlier run's checkpoints.

    Every rank checks (so all raise the same error, or none does); rank 0 writes.
    """
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.checkpoint.resume_from, out)
    if resume is None and list_checkpoints(out) and cfg.checkpoint.resume_from is None:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds checkpoints of an earlier run: set "
            "checkpoint.resume_from=latest to continue it, or choose a new train.output_dir"
        )
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    barrier()
    return out, resume


def make_encoder_factory(cfg: Config, device: torch.device, variant: VariantSpec) -> Callable[[], Encoder]:
    """Loads the VAE and T5 only when something actually needs encoding."""

    def make() -> Encoder:
        comps = load_components(cfg.model.path, cfg.model.dtype, parts=("vae", "text_encoder", "tokenizer"))
        set_vae_memory_options(comps.vae, cfg.data.vae_slicing, cfg.data.vae_tiling)
        return Encoder(comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer,
                       variant.max_text_seq_length, device)

    return make


def prepare_dataset(cfg: Config, samples: list[Sample], variant: VariantSpec, device: torch.device,
                    world: World = SINGLE_PROCESS) -> CachedDataset:
    """Cache every sample (encoding what is missing) and return the training dataset."""
    result = prepare(cfg, samples, variant.is_i2v, make_encoder_factory(cfg, device, variant), world,
                     show_progress=cfg.log.progress_bar and world.is_main)
    if world.is_main:
        print(result.summary(cache_dir_for(cfg)))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the encoders are gone; give their memory back before training
    return CachedDataset(result.items, TORCH_DTYPES[cfg.model.dtype])


def load_loop_components(cfg: Config, variant: VariantSpec, device: torch.device) -> Any:
    """What the loop needs besides the transformer: the scheduler always; the VAE for I2V (the
    image is encoded every step) and for validation; T5 only for validation."""
    parts = ["scheduler"]
    if variant.is_i2v or cfg.validation.every_steps:
        parts.append("vae")
    if cfg.validation.every_steps:
        parts += ["text_encoder", "tokenizer"]
    comps = load_components(cfg.model.path, cfg.model.dtype, parts=tuple(parts))
    if comps.vae is not None:
        set_vae_memory_options(comps.vae, cfg.data.vae_slicing, cfg.data.vae_tiling)
        comps.vae.to(device)
    return comps


def max_video_tokens(dataset: CachedDataset, variant: VariantSpec) -> int:
    """The largest per-sample video token count over the dataset's buckets (one item read each)."""
    first_of_bucket: dict[int, int] = {}
    for i, item in enumerate(dataset.items):
        first_of_bucket.setdefault(item.bucket, i)
    return max(video_tokens(dataset[i]["latents"].shape, variant) for i in first_of_bucket.values())
