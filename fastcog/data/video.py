"""Video and image decoding into the [-1, 1] float tensors the VAE expects.

Frame sampling and resizing are looked up by name in small registries (`SAMPLERS`,
`RESIZERS`), so a new mode is one function plus one registry entry and the decode path does
not change. The defaults are the reference trainer's behaviour, so cached latents match it.

Sampling, with N decoded frames and F requested:

- ``"reference"`` (default): ``range(0, N, N // F)[:F]`` when N >= F. This only spreads
  over the clip when N is a multiple of F (N=17, F=9 takes frames 0..8).
- ``"uniform"``: F indices evenly spread over the whole clip, ``round(linspace(0, N-1, F))``
  (halves round up; computed in integers so it is exact), so the first and last frames are
  always used.
- ``"random"``: a contiguous window with the reference stride ``s = max(1, N // F)``, i.e.
  ``start + s * k`` for k < F, with ``start`` uniform in ``[0, N - s*F]`` drawn from the
  caller's ``torch.Generator`` (required: a seeded generator is what makes a cached clip
  reproducible). Note that when N is a multiple of F the window is the whole clip and
  ``start`` is always 0.

In every mode a clip shorter than F (N < F) gives all N frames with the last one repeated up
to F, as the reference pads.

Resize, to (H, W):

- ``"stretch"`` (default): resize to exactly (H, W), aspect ratio not kept (reference).
- ``"resize_crop"``: scale uniformly so the frame covers (H, W), then centre-crop; nothing
  is stretched, the overhanging edges of the longer side are lost.

Resizing is ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
align_corners=False)`` on the float tensor. Antialiasing matters because training clips
are usually downscaled; without it bilinear aliases badly (moire on fine texture). This is
the same filter torchvision's tensor ``resize(antialias=True)`` uses, and it is close to
(but not bit-identical with) PIL's bilinear; the small difference is irrelevant after the
VAE. Images go through the same function so I2V conditioning frames and video frames are
resized identically.

`probe_video` reads a clip's frame count, fps and size from the container without decoding
(used to put clips into resolution buckets before anything is decoded).

Every failure a user can fix (missing file, undecodable file, no video stream, no frames)
raises `fastcog.errors.DataError` naming the file; the PyAV/Pillow error is chained, never
swallowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fastcog.errors import DataError

__all__ = [
    "RESIZERS",
    "SAMPLERS",
    "VideoInfo",
    "decode_video",
    "first_frame",
    "frame_indices",
    "load_image",
    "probe_video",
    "resize_frames",
]

# A sampler maps (frames available N >= 1, frames wanted F >= 1, rng) to F indices into the
# decoded clip. Only "random" uses the rng; the others ignore it.
Sampler = Callable[[int, int, torch.Generator | None], list[int]]
# A resizer maps float frames [T, 3, h, w] (values 0..255) to [T, 3, H, W].
Resizer = Callable[[torch.Tensor, int, int], torch.Tensor]


def _pad_short(num_available: int, num_frames: int) -> list[int]:
    """N < F: every frame, then the last one repeated up to F (the reference padding)."""
    return list(range(num_available)) + [num_available - 1] * (num_frames - num_available)


def _sample_reference(num_available: int, num_frames: int, rng: torch.Generator | None = None) -> list[int]:
    """Reference sampling: fixed stride N // F from frame 0, or pad with the last frame."""
    if num_available >= num_frames:
        return list(range(0, num_available, num_available // num_frames))[:num_frames]
    return _pad_short(num_available, num_frames)


def _sample_uniform(num_available: int, num_frames: int, rng: torch.Generator | None = None) -> list[int]:
    """round(linspace(0, N-1, F)), halves rounded up, in exact integer arithmetic.

    Float linspace + round would make the result depend on float error and on round-half-
    to-even; floor((2*i*(N-1) + (F-1)) / (2*(F-1))) is the same rule with no such doubt.
    With N >= F the step is >= 1, so the indices are strictly increasing (no repeats).
    """
    if num_available < num_frames:
        return _pad_short(num_available, num_frames)
    if num_frames == 1:
        return [0]  # linspace(0, N-1, 1) == [0]
    last, steps = num_available - 1, num_frames - 1
    return [(2 * i * last + steps) // (2 * steps) for i in range(num_frames)]


def _sample_random(num_available: int, num_frames: int, rng: torch.Generator | None = None) -> list[int]:
    """A random window with the reference stride; the start is drawn from `rng`."""
    if rng is None:
        raise ValueError("sampling 'random' needs a torch.Generator passed as rng (seed it for reproducibility)")
    if num_available < num_frames:
        return _pad_short(num_available, num_frames)
    stride = max(1, num_available // num_frames)
    slack = num_available - stride * num_frames  # >= 0 since stride * F <= N
    start = int(torch.randint(0, slack + 1, (1,), generator=rng).item())
    return [start + stride * k for k in range(num_frames)]


def _resize_stretch(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize to exactly (height, width); aspect ratio not kept."""
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def _resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale uniformly so the frame covers (height, width), then crop the centre.

    The scale is the larger of the two axis ratios, so one side fits exactly and the other
    overhangs and is cropped equally on both sides (the extra pixel, if odd, on the far
    side). The scaled size is rounded, so the two axes' scales differ by under one pixel.
    """
    src_h, src_w = frames.shape[-2:]
    if (src_h, src_w) == (height, width):
        return frames
    scale = max(height / src_h, width / src_w)
    # max() guards against rounding down below the target (e.g. 0.5 ulp below an integer).
    new_h = max(height, math.floor(src_h * scale + 0.5))
    new_w = max(width, math.floor(src_w * scale + 0.5))
    if (new_h, new_w) != (src_h, src_w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


SAMPLERS: dict[str, Sampler] = {
    "reference": _sample_reference,
    "uniform": _sample_uniform,
    "random": _sample_random,
}
RESIZERS: dict[str, Resizer] = {"stretch": _resize_stretch, "resize_crop": _resize_crop}


def _check_mode(kind: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ValueError(f"unknown {kind} mode {value!r}; valid choices: {', '.join(sorted(registry))}")


def _check_size(num_frames: int | None, height: int, width: int) -> None:
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")


def _check_rng(sampling: str, rng: torch.Generator | None) -> None:
    # Checked before any decoding, so a missing generator fails fast, not after a long decode.
    if sampling == "random" and rng is None:
        raise ValueError("sampling 'random' needs a torch.Generator passed as rng (seed it for reproducibility)")


def frame_indices(
    num_available: int,
    num_frames: int,
    sampling: str = "reference",
    rng: torch.Generator | None = None,
) -> list[int]:
    """Indices of the decoded frames that make up a clip of `num_frames` frames.

    Exposed on its own so that the trainer and tests can reason about which source frames a
    clip uses without decoding anything. `rng` is required for ``"random"`` (one draw per
    call when N >= F) and ignored otherwise.
    """
    _check_mode("sampling", sampling, SAMPLERS)
    _check_rng(sampling, rng)
    if num_available < 1:
        raise ValueError(f"num_available must be >= 1, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return SAMPLERS[sampling](num_available, num_frames, rng)


def resize_frames(frames: torch.Tensor, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """Resize float frames [T, 3, h, w] with the named resize mode."""
    _check_mode("resize", resize, RESIZERS)
    _check_size(None, height, width)
    return RESIZERS[resize](frames, height, width)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; fix the path or the list file that names it")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file; point the list file at the file itself")
    if os.path.getsize(path) == 0:
        raise DataError(f"{what} {path} is empty (0 bytes); re-export or remove it from the dataset")


def _decode_frames(path: Path, limit: int | None = None) -> list[av.VideoFrame]:
    """Decode up to `limit` frames (all if None) of the first video stream.

    Frames are kept as decoded (e.g. yuv420p: half the bytes of RGB, an eighth of float)
    and only the sampled ones are converted by `_frames_to_rgb`: the colour conversion is
    about a third of the decode time, and usually most frames are not sampled.

    A file cut short after its index (e.g. an mp4 written with `faststart` and then
    truncated) demuxes without error but yields fewer frames; the reference sampling would
    then silently repeat the last one. So when decoding everything, the demuxed packet count
    is checked against the frame count the container declares (when it declares one).
    Packets, not decoded frames, are compared because edit lists may legitimately drop
    decoded frames.
    """
    _check_file(path, "video")
    frames: list[av.VideoFrame] = []
    packets = 0
    declared = 0
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise DataError(f"video {path} has no video stream; re-export it as a video file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            declared = stream.frames  # 0 when the container does not say
            for packet in container.demux(stream):
                if packet.size:  # the demuxer ends with an empty flush packet
                    packets += 1
                frames.extend(packet.decode())
                if limit is not None and len(frames) >= limit:
                    return frames[:limit]
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(
            f"video {path} could not be decoded ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated or not a video: re-export it or remove it from the dataset"
        ) from exc
    if not frames:
        raise DataError(
            f"video {path} contains no decodable frames; re-export it or remove it from the dataset"
        )
    if declared and packets < declared:
        raise DataError(
            f"video {path} is truncated: its header declares {declared} frames but only {packets} "
            "are present; re-export it or remove it from the dataset"
        )
    return frames


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` reads from a clip's container: enough to pick a resolution bucket."""

    num_frames: int
    """Frames in the first video stream (the container's count, else the packets counted)."""
    fps: float
    """Average frame rate (frames / duration for variable-rate clips); 0.0 if unknown."""
    height: int
    """Decoded frame height in pixels (rotation metadata is ignored, as decoding ignores it)."""
    width: int
    """Decoded frame width in pixels."""


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:  # None or 0 when the container does not say
            return float(rate)
    return 0.0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and size of a clip's first video stream, without decoding frames.

    Bucketing every clip of a large dataset must not cost a full decode each, so this reads
    the container header (mp4/mov/avi store the frame count). Containers that do not store
    it (mkv/webm) have their packets counted instead, which reads the file but decodes
    nothing. Only one frame is decoded, and only when the header gives no frame size.

    The count comes from metadata, so a clip cut short after its index (a truncated
    `faststart` mp4) still probes with its declared length; `decode_video` checks for that.
    A missing, empty, unreadable or frameless file raises `DataError` naming it.
    """
    path = Path(path)
    _check_file(path, "video")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise DataError(f"video {path} has no video stream; re-export it as a video file")
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            height, width = stream.codec_context.height, stream.codec_context.width
            num_frames = stream.frames  # 0 when the container does not say
            if not num_frames:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            if num_frames and not (height and width):
                container.seek(0)
                frame = next(container.decode(stream), None)
                if frame is not None:
                    height, width = frame.height, frame.width
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(
            f"video {path} could not be read ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated or not a video: re-export it or remove it from the dataset"
        ) from exc
    if not num_frames or not (height and width):
        raise DataError(f"video {path} contains no frames; re-export it or remove it from the dataset")
    return VideoInfo(num_frames=int(num_frames), fps=fps, height=int(height), width=int(width))


def _frames_to_rgb(path: Path, frames: list[av.VideoFrame]) -> np.ndarray:
    """uint8 RGB [T, h, w, 3] of decoded frames (any pixel format, grayscale included)."""
    try:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in frames])
    except (av.error.FFmpegError, ValueError) as exc:
        raise DataError(
            f"video {path} has frames that cannot be converted to RGB ({type(exc).__name__}: {exc}); "
            "re-export it with a common pixel format such as yuv420p"
        ) from exc


def _to_unit_range(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [T, h, w, 3] -> float32 [T, 3, h, w] in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float()


def _normalise(frames: torch.Tensor) -> torch.Tensor:
    # Clamp first: the antialiased filter has non-negative weights, but keep the [-1, 1]
    # contract exact regardless of filter.
    return (frames.clamp_(0.0, 255.0) / 127.5 - 1.0).contiguous()


def decode_video(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    sampling: str = "reference",
    resize: str = "stretch",
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode a clip into float32 [num_frames, 3, height, width] in [-1, 1].

    All frames are decoded (every sampling mode needs the true frame count, which container
    metadata does not reliably give), the sampled ones are resized, then scaled with
    x / 127.5 - 1 as the VAE expects. `rng` (a CPU ``torch.Generator``) is required for
    ``sampling="random"``; seed it per clip to make the chosen window reproducible.
    """
    _check_mode("sampling", sampling, SAMPLERS)
    _check_mode("resize", resize, RESIZERS)
    _check_rng(sampling, rng)
    _check_size(num_frames, height, width)
    path = Path(path)
    decoded = _decode_frames(path)
    indices = SAMPLERS[sampling](len(decoded), num_frames, rng)
    unique = sorted(set(indices))  # padding repeats frames: convert each one once
    rgb = _frames_to_rgb(path, [decoded[i] for i in unique])
    position = {index: k for k, index in enumerate(unique)}
    chosen = rgb[[position[i] for i in indices]]
    frames = RESIZERS[resize](_to_unit_range(chosen), height, width)
    return _normalise(frames)


def first_frame(path: str | os.PathLike, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """First frame of a clip as float32 [3, height, width] in [-1, 1].

    I2V without an image list conditions on each clip's first frame; only that frame is
    decoded.
    """
    _check_mode("resize", resize, RESIZERS)
    _check_size(None, height, width)
    path = Path(path)
    rgb = _frames_to_rgb(path, _decode_frames(path, limit=1))
    frames = RESIZERS[resize](_to_unit_range(rgb), height, width)
    return _normalise(frames)[0]


def load_image(path: str | os.PathLike, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """Load an image as float32 [3, height, width] in [-1, 1], resized like video frames.

    Any Pillow mode (L, LA, P, RGBA, I;16, ...) is converted to RGB; alpha is dropped, not
    composited, matching what the reference does with `convert("RGB")`.
    """
    _check_mode("resize", resize, RESIZERS)
    _check_size(None, height, width)
    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode here so truncated files fail inside the try
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)  # writable copy for torch
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(
            f"image {path} could not be decoded ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated or not an image: re-export it or remove it from the dataset"
        ) from exc
    frames = RESIZERS[resize](_to_unit_range(rgb[None]), height, width)
    return _normalise(frames)[0]
