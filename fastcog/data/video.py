"""Video files: decoding videos and images to the [-1, 1] tensors the VAE expects; writing mp4.

Which frames are kept and how they are resized is fastcog.data.frames.

`probe_video` reads a clip's frame count, fps and displayed size from the container and its
first frame (used to put clips into resolution buckets before anything else is decoded).
`decode_video` streams: it picks the frames first and converts only those, and it turns
frames upright as the clip's display matrix (rotation metadata) says.

Every failure a user can fix (missing file, undecodable file, no video stream, no frames)
raises `fastcog.errors.DataError` naming the file; the PyAV/Pillow error is chained, never
swallowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange
from PIL import Image, UnidentifiedImageError

from fastcog.data.frames import RESIZERS, SAMPLERS, check_mode, check_rng, check_size, frame_converter
from fastcog.errors import DataError

__all__ = ["DecodedClip", "VideoInfo", "decode_clip", "decode_video", "default_codec", "first_frame", "load_image",
           "probe_video", "write_video"]

# Pixel formats whose chroma planes are subsampled horizontally and/or vertically, so the
# encoder rejects odd frame sizes.
_SUBSAMPLED_PIX_FMTS = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "nv12", "nv16", "nv21"}


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; fix the path or the list file that names it")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file; point the list file at the file itself")
    if os.path.getsize(path) == 0:
        raise DataError(f"{what} {path} is empty (0 bytes); re-export or remove it from the dataset")


def _open_video(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise DataError(f"video {path} has no video stream; re-export it as a video file")
    return container.streams.video[0]


def _read_error(path: Path, exc: Exception, verb: str = "decoded") -> DataError:
    return DataError(
        f"video {path} could not be {verb} ({type(exc).__name__}: {exc}); "
        "the file is corrupt, truncated or not a video: re-export it or remove it from the dataset"
    )


def _upright_rgb(path: Path, frame: av.VideoFrame) -> np.ndarray:
    """uint8 RGB [h, w, 3] of a decoded frame (any pixel format), turned as its display matrix says.

    Phones store portrait clips as landscape pixels plus a display matrix; `frame.rotation` is
    the matrix's counter-clockwise angle, so np.rot90 by the same quarter turns (also counter-
    clockwise) gives the picture a player shows. Flips in the matrix are not applied.
    """
    try:
        rgb = frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, ValueError) as exc:
        raise DataError(
            f"video {path} has frames that cannot be converted to RGB ({type(exc).__name__}: {exc}); "
            "re-export it with a common pixel format such as yuv420p"
        ) from exc
    turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _scan(path: Path, wanted: set[int], convert: Callable[[np.ndarray], torch.Tensor], stop_after: int | None = None
          ) -> tuple[dict[int, torch.Tensor], int]:
    """One streaming pass over the first video stream: ({index: converted frame} for the indices in
    `wanted`, the number of frames decoded, which is what sampling is defined on).

    Every other frame is dropped as decoded (e.g. yuv420p, never converted to RGB), so memory
    holds the converted output frames and a few decoder buffers, never the whole clip. With
    `stop_after` decoding stops once that many frames are out.

    A file cut short after its index (e.g. an mp4 written with `faststart` and then
    truncated) demuxes without error but yields fewer frames; the sampling would then
    silently repeat the last one. So a full pass checks the demuxed packet count against the
    frame count the container declares (when it declares one). Packets, not decoded frames,
    are compared because edit lists may legitimately drop decoded frames.
    """
    _check_file(path, "video")
    kept: dict[int, torch.Tensor] = {}
    packets = index = declared = 0
    try:
        with av.open(str(path), mode="r") as container:
            stream = _open_video(container, path)
            stream.thread_type = "AUTO"
            declared = stream.frames  # 0 when the container does not say
            for packet in container.demux(stream):
                if packet.size:  # the demuxer ends with an empty flush packet
                    packets += 1
                for frame in packet.decode():
                    if index in wanted:
                        kept[index] = convert(_upright_rgb(path, frame))
                    index += 1
                if stop_after is not None and index >= stop_after:
                    return kept, index
    except (av.error.FFmpegError, OSError) as exc:
        raise _read_error(path, exc) from exc
    if not index:
        raise DataError(f"video {path} contains no decodable frames; re-export it or remove it from the dataset")
    if declared and packets < declared:
        raise DataError(
            f"video {path} is truncated: its header declares {declared} frames but only {packets} "
            "are present; re-export it or remove it from the dataset"
        )
    return kept, index


def _header_frame_count(path: Path) -> int:
    """The container's frame count, else the packets counted (reads, decodes nothing); 0 if none."""
    _check_file(path, "video")
    try:
        with av.open(str(path), mode="r") as container:
            stream = _open_video(container, path)
            return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, OSError) as exc:
        raise _read_error(path, exc) from exc


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` reads from a clip's container: enough to pick a resolution bucket."""

    num_frames: int
    """Frames in the first video stream (the container's count, else the packets counted)."""
    fps: float
    """Average frame rate (frames / duration for variable-rate clips); 0.0 if unknown."""
    height: int
    """Displayed frame height in pixels: the decoded height, or the width when the clip's display
    matrix turns it a quarter (a portrait phone clip stored as landscape pixels)."""
    width: int
    """Displayed frame width in pixels."""
    rotation: int = 0
    """Counter-clockwise degrees the display matrix turns the decoded frames (decoding applies it)."""


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:  # None or 0 when the container does not say
            return float(rate)
    return 0.0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and displayed size of a clip's first video stream, decoding one frame.

    Bucketing every clip of a large dataset must not cost a full decode each, so the count
    comes from the container header (mp4/mov/avi store it). Containers that do not store it
    (mkv/webm) have their packets counted instead, which reads the file but decodes nothing.
    The first frame is decoded for its size and its display matrix (PyAV exposes the matrix
    on decoded frames only), so a portrait phone clip probes as portrait.

    The count comes from metadata, so a clip cut short after its index (a truncated
    `faststart` mp4) still probes with its declared length; `decode_video` checks for that.
    A missing, empty, unreadable or frameless file raises `DataError` naming it.
    """
    path = Path(path)
    _check_file(path, "video")
    height = width = rotation = 0
    try:
        with av.open(str(path), mode="r") as container:
            stream = _open_video(container, path)
            fps = _stream_fps(stream)
            height, width = stream.codec_context.height, stream.codec_context.width
            num_frames = stream.frames  # 0 when the container does not say
            if not num_frames:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            if num_frames:
                frame = next(container.decode(stream), None)
                if frame is not None:
                    height, width, rotation = frame.height, frame.width, frame.rotation
    except (av.error.FFmpegError, OSError) as exc:
        raise _read_error(path, exc, "read") from exc
    if not num_frames or not (height and width):
        raise DataError(f"video {path} contains no frames; re-export it or remove it from the dataset")
    if round(rotation / 90) % 2:
        height, width = width, height
    return VideoInfo(num_frames=int(num_frames), fps=fps, height=int(height), width=int(width), rotation=rotation)


@dataclass(frozen=True)
class DecodedClip:
    """A training clip and what it was made from."""

    frames: torch.Tensor
    """float32 [num_frames, 3, height, width] in [-1, 1]."""
    source_frames: int
    """Frames the file holds; fewer than requested means the last one was repeated (padding),
    one means a still image stands for the whole clip."""


def decode_clip(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    sampling: str = "reference",
    resize: str = "stretch",
    rng: torch.Generator | None = None,
) -> DecodedClip:
    """`decode_video`, also saying how many frames the file held (see `DecodedClip`).

    The frame indices are chosen from the container's frame count first, then the clip is
    decoded in one streaming pass that converts and resizes only those frames, so memory is
    bounded by the output clip, not the source. The indices are defined on the decoded count,
    as before; where that differs from the container's (edit lists, variable-rate or damaged
    files), the indices are drawn again from the decoded count (the same `rng` draw) and any
    frames not yet kept are decoded in a second pass.
    """
    check_mode("sampling", sampling, SAMPLERS)
    check_mode("resize", resize, RESIZERS)
    check_rng(sampling, rng)
    check_size(num_frames, height, width)
    path = Path(path)
    choose = SAMPLERS[sampling]
    rng_state = rng.get_state() if rng is not None else None
    convert = frame_converter(height, width, resize)
    expected = _header_frame_count(path)
    indices = choose(expected, num_frames, rng) if expected else []
    kept, decoded = _scan(path, set(indices), convert)
    if decoded != expected:
        if rng is not None:
            rng.set_state(rng_state)
        indices = choose(decoded, num_frames, rng)
        if missing := set(indices) - kept.keys():
            kept.update(_scan(path, missing, convert)[0])
    return DecodedClip(torch.stack([kept[i] for i in indices]), decoded)


def decode_video(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    sampling: str = "reference",
    resize: str = "stretch",
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode a clip into float32 [num_frames, 3, height, width] in [-1, 1], upright.

    `sampling` picks the frames (fastcog.data.frames; a clip shorter than num_frames repeats
    its last frame), `resize` scales them, then x / 127.5 - 1 as the VAE expects. A display
    matrix (rotation metadata) is honoured. `rng` (a CPU ``torch.Generator``) is required for
    ``sampling="random"``; seed it per clip to make the chosen window reproducible.
    """
    return decode_clip(path, num_frames, height, width, sampling, resize, rng).frames


def first_frame(path: str | os.PathLike, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """First frame of a clip, upright, as float32 [3, height, width] in [-1, 1].

    I2V without an image list conditions on each clip's first frame; only that frame is
    decoded.
    """
    check_mode("resize", resize, RESIZERS)
    check_size(None, height, width)
    return _scan(Path(path), {0}, frame_converter(height, width, resize), stop_after=1)[0][0]


def load_image(path: str | os.PathLike, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """Load an image as float32 [3, height, width] in [-1, 1], resized like video frames.

    Any Pillow mode (L, LA, P, RGBA, I;16, ...) is converted to RGB; alpha is dropped, not
    composited, matching what the reference does with `convert("RGB")`.
    """
    check_mode("resize", resize, RESIZERS)
    check_size(None, height, width)
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
    return frame_converter(height, width, resize)(rgb)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def default_codec() -> str:
    """libx264 when this PyAV build has it (smaller, closer to real data), else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def temp_path(path: Path) -> Path:
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
    tmp = temp_path(path)
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
