"""Synthetic, learnable video datasets for tests, smoke runs and benchmarks.

The content is deliberately simple and deterministic (a coloured square moving over a
gradient, a different colour/direction/size per clip, with a caption that says so), so a
short fine-tune can visibly learn it and tests can reason about pixel values. Files are
real mp4s written with PyAV, so the same decode path as real data is exercised.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange
from PIL import Image

__all__ = ["default_codec", "make_synthetic_dataset", "write_video"]

# Pixel formats whose chroma planes are subsampled horizontally and/or vertically, so the
# encoder rejects odd frame sizes.
_SUBSAMPLED_PIX_FMTS = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "nv12", "nv16", "nv21"}

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


def default_codec() -> str:
    """libx264 when this PyAV build has it (smaller, closer to real data), else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _temp_path(path: Path) -> Path:
    # Same directory (so os.replace is atomic), hidden, pid-unique (concurrent ranks may
    # write the same dataset), and the real suffix kept so the muxer/encoder is inferred.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str | None = None,
    pix_fmt: str = "yuv420p",
    pad: bool = False,
    crf: int = 18,
) -> Path:
    """Encode uint8 frames [F, H, W, 3] (RGB) or [F, H, W] (grayscale) to a video file.

    Written to a temporary name and renamed, so an interrupted write never leaves a file
    that looks complete. Subsampled pixel formats (yuv420p, the default, the one every
    player and the reference data use) need even sizes: odd sizes raise unless `pad=True`,
    which replicates the last row/column. Pass e.g. ``pix_fmt="yuv444p"`` (libx264) for odd
    sizes, ``pix_fmt="gray"`` for a single-channel stream, or ``codec="png"`` (lossless,
    decodes to true single-channel frames with ``pix_fmt="gray"``).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        # Grey frames go in as RGB so swscale does the full->limited range conversion that
        # the decoder undoes (a raw "gray" frame would be taken as limited-range luma).
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3] or [F, H, W], got {list(frames.shape)}")
    if frames.shape[0] < 1:
        raise ValueError("frames must contain at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    codec = codec or default_codec()
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not available in this PyAV build")

    height, width = frames.shape[1:3]
    if pix_fmt in _SUBSAMPLED_PIX_FMTS and (height % 2 or width % 2):
        if not pad:
            raise ValueError(
                f"{pix_fmt} needs even frame sizes, got {height}x{width}: crop/resize to even sizes, "
                "pass pad=True, or use pix_fmt='yuv444p'"
            )
        frames = np.pad(frames, [(0, 0), (0, height % 2), (0, width % 2), (0, 0)], mode="edge")
        height, width = frames.shape[1:3]

    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width = width
            stream.height = height
            stream.pix_fmt = pix_fmt
            if pix_fmt.startswith("gray"):
                # swscale makes full-range grey; say so in the stream, or decoders take it as
                # limited-range luma and stretch the levels (16 -> 0).
                stream.codec_context.color_range = ColorRange.JPEG
            if codec.startswith("libx264"):
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            elif codec == "mpeg4":
                stream.bit_rate = max(1_000_000, 8 * width * height * int(np.ceil(float(rate))))
            for i, arr in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush delayed (B-)frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    tmp = _temp_path(path)
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    tmp = _temp_path(path)
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
