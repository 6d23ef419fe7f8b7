"""Everything a run needs before its first step, checked before anything is written.

The model folder, the variant's config rules and every data file are checked first; then the
output directory is created (never over an earlier run's checkpoints); then the dataset is
encoded into the cache and the loop's components are loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastcog.checkpoint import checkpoint_step, list_checkpoints, resolve_resume
from fastcog.config import Config, save_config, validate_for_variant
from fastcog.data.cache import CachedDataset, Encoder
from fastcog.data.heldout import DataSplit, split_heldout
from fastcog.data.listfile import Sample, read_dataset
from fastcog.data.prepare import cache_dir_for, prepare
from fastcog.errors import ConfigError, DataError
from fastcog.flops import video_tokens
from fastcog.models import TORCH_DTYPES, load_components, read_variant, set_vae_memory_options
from fastcog.parallel import SINGLE_PROCESS, World, barrier
from fastcog.resume import check_resume, run_record, segment_config_path
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


def check_inputs(cfg: Config, training: bool = True) -> tuple[VariantSpec, list[Sample]]:
    """check_data, with every sample to encode in one list (the held-out ones last)."""
    variant, split = check_data(cfg, training)
    return variant, split.all


def check_data(cfg: Config, training: bool = True) -> tuple[VariantSpec, DataSplit]:
    """Model folder, variant-specific config rules, LoRA targets, every data file (the held-out
    set's too), and that the cache can be written when something needs encoding; for `training`
    also the tracker package and a writable output dir (`fastcog prepare` needs neither). All
    before any output, so a mistake found here leaves earlier outputs as they were."""
    from fastcog.lora import check_target_modules
    from fastcog.metrics import check_tracker_available
    from fastcog.models import meta_transformer

    d = cfg.data
    variant = read_variant(cfg.model.path)
    validate_for_variant(cfg, variant)
    if cfg.model.training_type == "lora":
        check_target_modules(cfg.lora, meta_transformer(cfg.model.path))
    if training:
        check_tracker_available(cfg.log.report_to)
        out = Path(cfg.train.output_dir)
        reason = unwritable_reason(out)
        if reason:
            raise ConfigError(f"train.output_dir={str(out)!r} cannot be written ({reason}): choose a writable "
                              "train.output_dir")
    samples = read_dataset(d.data_root, metadata_file=d.metadata_file, caption_column=d.caption_column,
                           video_column=d.video_column, image_column=d.image_column)
    split = split_heldout(cfg, samples)
    check_cache_writable(cfg, split.all, variant)
    return variant, split


def unwritable_reason(path: Path) -> str | None:
    """Why `path` cannot be created or written into, or None when it can.

    The nearest folder that exists decides. os.access asks the OS without writing a probe file,
    so nothing is touched; it honours read-only mounts, and for root it says yes, as writes would.
    """
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only"
    return None


def check_cache_writable(cfg: Config, samples: list[Sample], variant: VariantSpec) -> None:
    """The cache (data.cache_dir, default beside the clips in data_root) must be writable when any
    sample still needs encoding; a complete cache is only read, so a read-only dataset folder with
    its cache already in place is fine."""
    from fastcog.data.prepare import plan

    cache = cache_dir_for(cfg)
    reason = unwritable_reason(cache)
    if reason is None:
        return
    planned, _ = plan(cfg, samples, variant.is_i2v)  # only now: planning reads every clip's metadata
    missing = sum(1 for item in planned if item.missing())
    if not missing:
        return
    d = cfg.data
    key, value = ("data.cache_dir", d.cache_dir) if d.cache_dir else ("data.data_root", d.data_root)
    raise ConfigError(f"{key}={value!r}: {missing} of {len(planned)} samples need encoding into the cache {cache}, "
                      f"which cannot be written ({reason}): set data.cache_dir to a writable folder")


def prepare_output_dir(cfg: Config, variant: VariantSpec, world: World = SINGLE_PROCESS,
                       ) -> tuple[Path, Path | None, dict[str, Any]]:
    """Create the output dir; refuse to overwrite an earlier run's checkpoints, or to resume one
    with a config that would train something else (fastcog.resume). Returns (output dir, checkpoint
    to resume or None, this run's record for its checkpoints).

    Every rank checks (so all raise the same error, or none does); rank 0 writes, and only after
    every check passed: a refused resume leaves config.yaml and the checkpoints as they were.
    """
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.checkpoint.resume_from, out)
    if resume is None and list_checkpoints(out) and cfg.checkpoint.resume_from is None:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds checkpoints of an earlier run: set "
            "checkpoint.resume_from=latest to continue it, or choose a new train.output_dir"
        )
    record = run_record(cfg, variant.name, world.world_size)
    accepted = check_resume(resume, record).accepted if resume is not None else []
    if world.is_main:
        for line in accepted:
            print(f"resume: {line} (accepted)")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        segment = segment_config_path(out, checkpoint_step(resume) if resume is not None else 0)
        segment.parent.mkdir(exist_ok=True)
        save_config(cfg, segment)
    barrier()
    return out, resume, record


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
    return prepare_datasets(cfg, DataSplit(samples), variant, device, world)[0]


def prepare_datasets(cfg: Config, split: DataSplit, variant: VariantSpec, device: torch.device,
                     world: World = SINGLE_PROCESS) -> tuple[CachedDataset, CachedDataset | None]:
    """Cache every sample, training and held-out, in one pass (one report, one failure budget);
    returns (the training dataset, the held-out one or None). The held-out items are only in the
    second: the training sampler never sees them."""
    samples = split.all
    result = prepare(cfg, samples, variant.is_i2v, make_encoder_factory(cfg, device, variant), world,
                     show_progress=cfg.log.progress_bar and world.is_main)
    if world.is_main:
        print(result.summary(cache_dir_for(cfg)))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the encoders are gone; give their memory back before training
    # result.items holds the samples that did not fail, in sample order: put the indices back.
    failed = {f["index"] for f in result.failures}
    kept = [i for i in range(len(samples)) if i not in failed]
    dtype = TORCH_DTYPES[cfg.model.dtype]
    train = CachedDataset([it for i, it in zip(kept, result.items, strict=True) if i < len(split.train)], dtype)
    if not split.heldout:
        return train, None
    heldout = [it for i, it in zip(kept, result.items, strict=True) if i >= len(split.train)]
    if not heldout:
        raise DataError(f"every held-out clip failed to decode ({split.source}); see "
                        f"{cache_dir_for(cfg) / 'failures.jsonl'}")
    return train, CachedDataset(heldout, dtype)


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
