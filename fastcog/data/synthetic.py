"""Synthetic, learnable video datasets for tests, smoke runs and benchmarks.

The content is deliberately simple and deterministic (a coloured square moving over a
gradient, a different colour/direction/size per clip, with a caption that says so), so a
short fine-tune can visibly learn it and tests can reason about pixel values. Files are
real mp4s written with PyAV, so the same decode path as real data is exercised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastcog.data.video import temp_path, write_video

__all__ = ["make_synthetic_dataset"]

_COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (230, 30, 30)),
    ("green", (30, 200, 40)),
    ("blue", (40, 60, 235)),
    ("yellow", (240, 225, 30)),
    ("cyan", (30, 220, 230)),
    ("magenta", (225, 40, 215)),
    ("white", (245, 245, 245)),
    ("orange", (250, 140, 20)),
]
_DIRECTIONS = ["left to right", "right to left", "top to bottom", "bottom to top"]
_SIZES = [("small", 0.25), ("large", 0.45)]

_MARKER = ".fastcog_synthetic.json"
_FORMAT_VERSION = 1


def _clip_frames(
    combo: int, variant: int, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, str]:
    """Frames [F, H, W, 3] and caption for one clip: a square moving over a gradient."""
    n_colours, n_dirs = len(_COLOURS), len(_DIRECTIONS)
    colour_name, colour = _COLOURS[combo % n_colours]
    direction = _DIRECTIONS[(combo // n_colours) % n_dirs]
    size_name, size_frac = _SIZES[(combo // (n_colours * n_dirs)) % len(_SIZES)]

    # Background: a dark vertical gradient whose tint depends on the variant, so clips that
    # share colour/direction/size still differ.
    ramp = np.linspace(20, 90, height, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.8 + 0.1 * (variant % 3), 0.6 + 0.2 * (variant % 2)], dtype=np.float32)
    background = np.broadcast_to(ramp * tint, (height, width, 3)).astype(np.uint8)

    side = max(2, int(round(min(height, width) * size_frac)))
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for f in range(num_frames):
        t = f / (num_frames - 1) if num_frames > 1 else 0.0
        if direction in ("right to left", "bottom to top"):
            t = 1.0 - t
        if direction in ("left to right", "right to left"):
            x, y = int(round(t * (width - side))), (height - side) // 2
        else:
            x, y = (width - side) // 2, int(round(t * (height - side)))
        out[f] = background
        out[f, y : y + side, x : x + side] = colour

    caption = f"a {size_name} {colour_name} square moving {direction}"
    if variant:
        caption += f", variation {variant}"
    return out, caption


def _expected_files(root: Path, names: list[str], with_images: bool) -> list[Path]:
    files = [root / "prompts.txt", root / "videos.txt"] + [root / "videos" / f"{n}.mp4" for n in names]
    if with_images:
        files += [root / "images.txt"] + [root / "images" / f"{n}.png" for n in names]
    return files


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    tmp = temp_path(path)
    try:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_synthetic_dataset(
    root: str | os.PathLike,
    num_clips: int,
    num_frames: int,
    height: int,
    width: int,
    fps: float = 8.0,
    seed: int = 0,
    with_images: bool = False,
) -> Path:
    """Write a reference-layout list dataset under `root` and return `root`.

    Layout: ``videos/clip_XXX.mp4``, ``prompts.txt`` (one distinct caption per clip),
    ``videos.txt`` (relative paths) and, with `with_images`, ``images/clip_XXX.png`` (each
    clip's first frame) plus ``images.txt``.

    Idempotent: a marker file recording the parameters is written last, so if it matches
    and every file is present the dataset is left alone; otherwise (first run, a run killed
    half-way, other parameters) everything is rewritten. Each file goes through a temp name
    and os.replace, so no half-written file ever carries a final name.
    """
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"num_clips and num_frames must be >= 1, got {num_clips} and {num_frames}")
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ValueError(f"height and width must be even and >= 2 (yuv420p video), got {height}x{width}")
    root = Path(root)
    digits = max(3, len(str(num_clips - 1)))
    names = [f"clip_{i:0{digits}d}" for i in range(num_clips)]
    params = {
        "version": _FORMAT_VERSION,
        "num_clips": num_clips,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "fps": fps,
        "seed": seed,
        "with_images": with_images,
    }
    marker = root / _MARKER
    if marker.is_file() and all(p.is_file() for p in _expected_files(root, names, with_images)):
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == params:
                return root
        except (OSError, ValueError):
            pass  # unreadable marker: regenerate
    marker.unlink(missing_ok=True)  # from here on the dataset is incomplete until rewritten

    (root / "videos").mkdir(parents=True, exist_ok=True)
    if with_images:
        (root / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    n_combos = len(_COLOURS) * len(_DIRECTIONS) * len(_SIZES)
    order = rng.permutation(n_combos)
    captions: list[str] = []
    for i, name in enumerate(names):
        frames, caption = _clip_frames(int(order[i % n_combos]), i // n_combos, num_frames, height, width)
        captions.append(caption)
        write_video(root / "videos" / f"{name}.mp4", frames, fps)
        if with_images:
            _write_png(root / "images" / f"{name}.png", frames[0])

    _write_text(root / "prompts.txt", captions)
    _write_text(root / "videos.txt", [f"videos/{n}.mp4" for n in names])
    if with_images:
        _write_text(root / "images.txt", [f"images/{n}.png" for n in names])
    _write_text(marker, [json.dumps(params, sort_keys=True)])
    return root
