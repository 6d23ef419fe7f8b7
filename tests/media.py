"""Test-only media helpers: datasets of mixed clip shapes, corrupt (truncated) files, and clips
with rotation metadata (a display matrix) like the ones phones record.

Built on fastcog.data.synthetic's clip drawing and atomic writers, which the installed package
keeps for `make_synthetic_dataset` (demo, smoke runs, benchmarks); what only the tests need
lives here.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from fastcog.data.synthetic import (
    _COLOURS,
    _DIRECTIONS,
    _MARKER,
    _SIZES,
    _clip_frames,
    _write_text,
)
from fastcog.data.video import temp_path, write_video

__all__ = ["DISPLAY_TURNS", "make_mixed_dataset", "truncate_file", "write_displayed_clip"]

_MIXED_FORMAT_VERSION = 1
_SPEC_KEYS = {"num_frames", "height", "width", "fps"}
_OPTIONAL_SPEC_KEYS = {"codec", "pix_fmt"}


def _metadata_text(captions: list[str], videos: list[str]) -> tuple[str, str]:
    """metadata.csv and metadata.jsonl contents holding the same (caption, video) rows."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")  # quotes captions that contain commas
    writer.writerow(["caption", "video"])
    writer.writerows(zip(captions, videos))
    jsonl = "".join(json.dumps({"caption": c, "video": v}) + "\n" for c, v in zip(captions, videos))
    return buf.getvalue(), jsonl


def _write_raw(path: Path, text: str) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_spec(i: int, spec: dict) -> None:
    missing = _SPEC_KEYS - spec.keys()
    unknown = spec.keys() - _SPEC_KEYS - _OPTIONAL_SPEC_KEYS
    if missing or unknown:
        raise ValueError(
            f"spec {i} {spec}: missing {sorted(missing)}, unknown {sorted(unknown)}; each spec needs "
            f"{sorted(_SPEC_KEYS)} and may have {sorted(_OPTIONAL_SPEC_KEYS)}"
        )
    if spec["num_frames"] < 1 or spec["height"] < 1 or spec["width"] < 1 or spec["fps"] <= 0:
        raise ValueError(f"spec {i} {spec}: num_frames, height, width must be >= 1 and fps > 0")


def make_mixed_dataset(root: str | os.PathLike, specs: Sequence[dict], seed: int = 0) -> Path:
    """Write a dataset of clips with varied sizes, lengths and frame rates; return `root`.

    For tests of resolution buckets and odd inputs. Each spec is a dict with `num_frames`,
    `height`, `width` and `fps` (optionally `codec` and `pix_fmt`, passed to `write_video`).
    Odd sizes default to ``yuv444p`` (libx264) so the clip keeps its exact size instead of
    being padded; other sizes to ``yuv420p``.

    Layout: ``videos/clip_XXX.mp4`` (clip i follows spec i), ``prompts.txt`` and
    ``videos.txt`` (reference list files), and ``metadata.csv`` / ``metadata.jsonl`` with the
    same rows in columns ``caption`` and ``video``. Captions are distinct and name the clip's
    shape ("..., 48x32, 9 frames at 8 fps"), so every CSV caption is a quoted field. Idempotent like
    `make_synthetic_dataset`: a marker recording (specs, seed) is written last.
    """
    if not specs:
        raise ValueError("specs must hold at least one clip spec")
    specs = [dict(spec) for spec in specs]
    for i, spec in enumerate(specs):
        _check_spec(i, spec)
    root = Path(root)
    digits = max(3, len(str(len(specs) - 1)))
    names = [f"clip_{i:0{digits}d}" for i in range(len(specs))]
    videos = [f"videos/{n}.mp4" for n in names]
    params = {"version": _MIXED_FORMAT_VERSION, "kind": "mixed", "specs": specs, "seed": seed}
    files = [root / name for name in ("prompts.txt", "videos.txt", "metadata.csv", "metadata.jsonl")]
    files += [root / v for v in videos]
    marker = root / _MARKER
    if marker.is_file() and all(p.is_file() for p in files):
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == json.loads(json.dumps(params)):
                return root
        except (OSError, ValueError):
            pass  # unreadable marker: regenerate
    marker.unlink(missing_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)

    n_combos = len(_COLOURS) * len(_DIRECTIONS) * len(_SIZES)
    order = np.random.default_rng(seed).permutation(n_combos)
    captions: list[str] = []
    for i, (spec, video) in enumerate(zip(specs, videos)):
        height, width = int(spec["height"]), int(spec["width"])
        num_frames = int(spec["num_frames"])
        frames, caption = _clip_frames(int(order[i % n_combos]), i // n_combos, num_frames, height, width)
        # The shape in the caption keeps captions distinct and puts commas in every one.
        captions.append(f"{caption}, {width}x{height}, {num_frames} frames at {spec['fps']:g} fps")
        pix_fmt = spec.get("pix_fmt") or ("yuv444p" if height % 2 or width % 2 else "yuv420p")
        write_video(root / video, frames, float(spec["fps"]), codec=spec.get("codec"), pix_fmt=pix_fmt)

    csv_text, jsonl_text = _metadata_text(captions, videos)
    _write_text(root / "prompts.txt", captions)
    _write_text(root / "videos.txt", videos)
    _write_raw(root / "metadata.csv", csv_text)
    _write_raw(root / "metadata.jsonl", jsonl_text)
    _write_text(marker, [json.dumps(params, sort_keys=True)])
    return root


def truncate_file(path: str | os.PathLike, fraction: float, dest: str | os.PathLike | None = None) -> Path:
    """Keep the first `fraction` (0 <= fraction < 1) of a file's bytes; return the result's path.

    Makes corrupt media for tests: an mp4 written by `write_video` keeps its index at the
    end, so any real cut makes it unopenable. With `dest` the truncated bytes go to a new
    file (the source is kept); without it the file is truncated in place.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    path = Path(path)
    size = path.stat().st_size
    keep = int(size * fraction)
    if dest is None:
        os.truncate(path, keep)
        return path
    dest = Path(dest)
    with path.open("rb") as src:
        data = src.read(keep)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


# Display matrices in the mp4 `tkhd` layout [a, b, u, c, d, v, x, y, w] (a..d in 16.16 fixed point, w in
# 2.30): a player shows the stored pixel at column u, row v at (a*u + c*v, b*u + d*v). The keys say how a
# player turns the stored frame to show it; "clockwise" is what phones write for a portrait clip (ffprobe
# reports it as "rotation of -90.00 degrees"). Each value pairs the matrix with the np.rot90 quarter turns
# (counter-clockwise) that store an upright picture so that the player's turn restores it.
_ONE, _W = 1 << 16, 1 << 30
DISPLAY_TURNS: dict[str, tuple[list[int], int]] = {
    "clockwise": ([0, _ONE, 0, -_ONE, 0, 0, 0, 0, _W], 1),
    "anticlockwise": ([0, -_ONE, 0, _ONE, 0, 0, 0, 0, _W], -1),
    "half": ([-_ONE, 0, 0, 0, -_ONE, 0, 0, 0, _W], 2),
}


def write_displayed_clip(path: str | os.PathLike, upright: np.ndarray, turn: str, fps: int = 8) -> Path:
    """Write uint8 RGB frames [F, H, W, 3] so that a player shows them as given: the pixels stored turned
    the other way, plus a real display matrix (stream side data in the mp4) saying how to turn them back."""
    matrix, quarter_turns = DISPLAY_TURNS[turn]
    stored = np.ascontiguousarray(np.rot90(upright, quarter_turns, axes=(1, 2)))
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = stored.shape[2], stored.shape[1], "yuv420p"
        stream.set_display_matrix(matrix)
        for i, array in enumerate(stored):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
