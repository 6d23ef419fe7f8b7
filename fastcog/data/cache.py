"""Latent and text-embedding cache: encode once before training, read every step after.

Each cached item is one safetensors file whose name is a hash of everything that changes its
content (docs/reference.md, bugs table: the reference keys on the file name only): the model
folder and its component configs, the compute dtype, the resolution and frame count, the
sampling and resize modes, VAE tiling, and the source file's absolute path, size and mtime
(or the prompt text).
A file is written under a temporary name and renamed into place, so an item that exists is
complete: a run killed part-way resumes by encoding only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastcog.errors import ModelError
from fastcog.variants import VAE_SPATIAL_FACTOR

# Bump when the stored layout or what an item holds changes: old items are then simply not found.
# 2: the VAE sample / frame-window seed depends on the clip's path under data_root, not on the key.
# 3: clips with a display matrix (phone footage) are decoded upright; earlier items of such clips lie on
#    their side, and the key cannot tell them apart without probing every clip.
CACHE_FORMAT = 3


@dataclass(frozen=True)
class CacheSpec:
    """What, besides the source file, determines a cached item's content."""

    model_fingerprint: str
    dtype: str
    num_frames: int
    height: int
    width: int
    sampling: str = "reference"
    resize: str = "stretch"
    latent_mode: str = "sample"
    seed: int = 0
    """Seeds the VAE sample and `random` frame windows (per item, so sharding cannot change them)."""
    vae_tiling: bool = True
    """Tiled encoding gives slightly different latents above the VAE's tile size."""


@dataclass(frozen=True)
class CachedItem:
    """Paths of one training sample's cached tensors, and its resolution bucket."""

    latents: Path
    prompt_embeds: Path
    image: Path | None = None
    bucket: int = 0


def model_fingerprint(model_path: Path) -> str:
    """Hash of the model folder's path and the configs of the components that encode."""
    h = hashlib.sha256(str(model_path.resolve()).encode())
    for part in ("vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json"):
        f = model_path / part
        h.update(f.read_bytes() if f.is_file() else b"-")
        weights = sorted((model_path / part).parent.glob("*.safetensors"))
        for w in weights:
            st = w.stat()
            h.update(f"{w.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def item_seed(spec: CacheSpec, video: Path, data_root: Path) -> int:
    """The seed of a clip's VAE sample and `random` frame window.

    From train.seed and the clip's path relative to data_root (its name when it lies outside),
    never from the cache key: the key holds absolute paths and mtimes (right for invalidation),
    which made the same dataset copied elsewhere, or regenerated, draw other latents.
    """
    try:
        name = video.resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        name = video.name
    return int(_digest("item-seed", name, spec.seed)[:15], 16)


def video_key(spec: CacheSpec, video: Path) -> str:
    return _digest(CACHE_FORMAT, "video", spec.__dict__, _file_identity(video))


def image_key(spec: CacheSpec, source: Path, from_video: bool) -> str:
    return _digest(CACHE_FORMAT, "image", spec.__dict__, _file_identity(source), from_video)


def prompt_key(spec: CacheSpec, prompt: str) -> str:
    return _digest(CACHE_FORMAT, "prompt", spec.model_fingerprint, spec.dtype, prompt)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write safetensors to a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Encoder:
    """VAE + T5 encoding as the reference does it (one frozen latent sample, padded T5)."""

    def __init__(self, vae: Any, text_encoder: Any, tokenizer: Any, max_text_len: int, device: torch.device,
                 ) -> None:
        """vae: with tiling / slicing already set (fastcog.models.set_vae_memory_options)."""
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.max_text_len = max_text_len
        self.device = device

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, mode: str = "sample", seed: int = 0) -> torch.Tensor:
        """[F, 3, H, W] in [-1, 1] -> scaled latents [C, F', H/8, W/8].

        `sample` draws one latent from the VAE posterior, as the reference does, but from a
        generator seeded per item (the reference uses the global RNG, so its cache depends on
        the encoding order and the number of ranks); `mean` takes the posterior mean.
        """
        x = frames.to(self.device, self.vae.dtype).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, F, H, W]
        dist = self.vae.encode(x).latent_dist
        if mode == "mean":
            latents = dist.mode()
        else:
            latents = dist.sample(generator=torch.Generator(self.device).manual_seed(seed))
        height, width = x.shape[-2:]
        if latents.shape[-2:] != (height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR):
            # Tiles whose edges miss the 8 px latent grid (a VAE configured with an odd sample size).
            raise ModelError(f"the VAE's tiled encode gave {tuple(latents.shape[-2:])} latents for {height}x{width} "
                             "frames; set data.vae_tiling: false")
        return latents[0] * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Caption -> [max_text_len, D] T5 embedding (padded, no attention mask: as the reference)."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_text_len, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0][0]


class CachedDataset(torch.utils.data.Dataset):
    """Reads cached tensors; yields the batch dict the objective takes (without the batch dim)."""

    def __init__(self, items: Sequence[CachedItem], dtype: torch.dtype) -> None:
        self.items = list(items)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        it = self.items[index]
        out = {
            "latents": load_file(str(it.latents))["latents"].to(self.dtype),
            "prompt_embeds": load_file(str(it.prompt_embeds))["prompt_embeds"].to(self.dtype),
        }
        if it.image is not None:
            # fp32, as the reference: the per-step pixel noise is drawn and added in fp32 and
            # only the noised image is cast to the VAE's dtype (Objective.encode_image).
            out["images"] = load_file(str(it.image))["image"].float()
        return out
