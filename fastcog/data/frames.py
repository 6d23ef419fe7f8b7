"""Which frames of a decoded clip make a training clip, and how they are resized.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RESIZERS", "SAMPLERS", "frame_converter", "frame_indices", "normalise", "resize_frames", "to_unit_range"]

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


def to_unit_range(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [T, h, w, 3] -> float32 [T, 3, h, w] in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float()


def normalise(frames: torch.Tensor) -> torch.Tensor:
    # Clamp first: the antialiased filter has non-negative weights, but keep the [-1, 1]
    # contract exact regardless of filter.
    return (frames.clamp_(0.0, 255.0) / 127.5 - 1.0).contiguous()


def frame_converter(height: int, width: int, resize: str) -> Callable[[np.ndarray], torch.Tensor]:
    """One upright uint8 RGB frame -> float32 [3, height, width] in [-1, 1].

    Frame by frame as decoded, so only output-sized frames are kept; the filter and the
    scaling are elementwise per frame, so the result equals resizing the stacked clip.
    """
    def convert(rgb: np.ndarray) -> torch.Tensor:
        return normalise(RESIZERS[resize](to_unit_range(rgb[None]), height, width))[0]

    return convert


def check_mode(kind: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ValueError(f"unknown {kind} mode {value!r}; valid choices: {', '.join(sorted(registry))}")


def check_size(num_frames: int | None, height: int, width: int) -> None:
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")


def check_rng(sampling: str, rng: torch.Generator | None) -> None:
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
    check_mode("sampling", sampling, SAMPLERS)
    check_rng(sampling, rng)
    if num_available < 1:
        raise ValueError(f"num_available must be >= 1, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return SAMPLERS[sampling](num_available, num_frames, rng)


def resize_frames(frames: torch.Tensor, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """Resize float frames [T, 3, h, w] with the named resize mode."""
    check_mode("resize", resize, RESIZERS)
    check_size(None, height, width)
    return RESIZERS[resize](frames, height, width)
