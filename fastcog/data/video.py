"""Video and image decoding into the [-1, 1] float tensors the VAE expects.

Frame sampling and resizing are looked up by name in small registries (`SAMPLERS`,
`RESIZERS`) so that later modes (`uniform`/`random` sampling, `resize_crop`) slot in
without touching the decode path. Only the reference modes exist today:

- sampling ``"reference"``: with N decoded frames and F requested, take
  ``range(0, N, N // F)[:F]`` when N >= F, else all N frames with the last one repeated
  up to F. This is what the reference trainer does, so cached latents match it.
- resize ``"stretch"``: resize to exactly (H, W), aspect ratio not kept, bilinear.

Resizing is ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
align_corners=False)`` on the float tensor. Antialiasing matters because training clips
are usually downscaled; without it bilinear aliases badly (moire on fine texture). This is
the same filter torchvision's tensor ``resize(antialias=True)`` uses, and it is close to
(but not bit-identical with) PIL's bilinear; the small difference is irrelevant after the
VAE. Images go through the same function so I2V conditioning frames and video frames are
resized identically.

Every failure a user can fix (missing file, undecodable file, no video stream, no frames)
raises `fastcog.errors.DataError` naming the file; the PyAV/Pillow error is chained, never
swallowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
    "decode_video",
    "first_frame",
    "frame_indices",
    "load_image",
    "resize_frames",
]

# A sampler maps (frames available N, frames wanted F) to F indices into the decoded clip.
# Later modes that need randomness will take an rng through decode_video; the reference
# mode is deterministic.
Sampler = Callable[[int, int], list[int]]
# A resizer maps float frames [T, 3, h, w] (values 0..255) to [T, 3, H, W].
Resizer = Callable[[torch.Tensor, int, int], torch.Tensor]


def _sample_reference(num_available: int, num_frames: int) -> list[int]:
    """Reference sampling: fixed stride N // F from frame 0, or pad with the last frame."""
    if num_available >= num_frames:
        return list(range(0, num_available, num_available // num_frames))[:num_frames]
    return list(range(num_available)) + [num_available - 1] * (num_frames - num_available)


def _resize_stretch(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize to exactly (height, width); aspect ratio not kept."""
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


SAMPLERS: dict[str, Sampler] = {"reference": _sample_reference}
RESIZERS: dict[str, Resizer] = {"stretch": _resize_stretch}


def _check_mode(kind: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ValueError(f"unknown {kind} mode {value!r}; valid choices: {', '.join(sorted(registry))}")


def _check_size(num_frames: int | None, height: int, width: int) -> None:
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")


def frame_indices(num_available: int, num_frames: int, sampling: str = "reference") -> list[int]:
    """Indices of the decoded frames that make up a clip of `num_frames` frames.

    Exposed on its own so that the trainer and tests can reason about which source frames a
    clip uses without decoding anything.
    """
    _check_mode("sampling", sampling, SAMPLERS)
    if num_available < 1:
        raise ValueError(f"num_available must be >= 1, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return SAMPLERS[sampling](num_available, num_frames)


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


def _decode_rgb_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """Decode up to `limit` frames (all if None) of the first video stream as uint8 RGB [h, w, 3].

    Frames are kept as uint8 at source resolution (4x smaller than float) until the sampled
    ones are converted. `to_ndarray(format="rgb24")` converts any pixel format, grayscale
    included, to 3 channels.

    A file cut short after its index (e.g. an mp4 written with `faststart` and then
    truncated) demuxes without error but yields fewer frames; the reference sampling would
    then silently repeat the last one. So when decoding everything, the demuxed packet count
    is checked against the frame count the container declares (when it declares one).
    Packets, not decoded frames, are compared because edit lists may legitimately drop
    decoded frames.
    """
    _check_file(path, "video")
    frames: list[np.ndarray] = []
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
                for frame in packet.decode():
                    frames.append(frame.to_ndarray(format="rgb24"))
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
) -> torch.Tensor:
    """Decode a clip into float32 [num_frames, 3, height, width] in [-1, 1].

    All frames are decoded (the reference sampling needs the true frame count, which
    container metadata does not reliably give), the sampled ones are resized, then scaled
    with x / 127.5 - 1 as the VAE expects.
    """
    _check_mode("sampling", sampling, SAMPLERS)
    _check_mode("resize", resize, RESIZERS)
    _check_size(num_frames, height, width)
    path = Path(path)
    decoded = _decode_rgb_frames(path)
    indices = SAMPLERS[sampling](len(decoded), num_frames)
    chosen = np.stack([decoded[i] for i in indices])
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
    frame = _decode_rgb_frames(path, limit=1)[0]
    frames = RESIZERS[resize](_to_unit_range(frame[None]), height, width)
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
