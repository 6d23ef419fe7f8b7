"""Decoding: shapes, range, which source frames are sampled, odd inputs, and bad files."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fastcog.data.synthetic import write_video
from fastcog.data.video import decode_video, first_frame, frame_indices, load_image
from fastcog.errors import DataError

H, W = 32, 48
# Frame i is a flat grey of value BASE + STEP * i: after a lossy round trip the mean
# brightness still identifies the source frame (codec error is a few levels, STEP is 14).
BASE, STEP = 16, 14


def _index_frames(n: int, height: int = H, width: int = W) -> np.ndarray:
    values = BASE + STEP * np.arange(n)
    assert values.max() <= 255
    return np.broadcast_to(values[:, None, None, None], (n, height, width, 3)).astype(np.uint8)


def _decoded_indices(video: torch.Tensor) -> list[int]:
    levels = (video.mean(dim=(1, 2, 3)) + 1.0) * 127.5
    idx = (levels - BASE) / STEP
    assert torch.all((idx - idx.round()).abs() < 0.3), f"ambiguous frame levels {levels.tolist()}"
    return [int(i) for i in idx.round()]


@pytest.fixture(scope="module")
def indexed_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("indexed")
    return {n: write_video(root / f"n{n}.mp4", _index_frames(n), fps=8) for n in (5, 9, 16, 17)}


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [
        (17, 4, [0, 4, 8, 12]),
        (9, 4, [0, 2, 4, 6]),
        (16, 16, list(range(16))),
        (17, 9, list(range(9))),  # stride 17 // 9 == 1: the first F frames, not spread out
        (5, 8, [0, 1, 2, 3, 4, 4, 4, 4]),
        (1, 3, [0, 0, 0]),
    ],
)
def test_frame_indices_reference(n: int, f: int, expected: list[int]) -> None:
    assert frame_indices(n, f) == expected


def test_unknown_modes_name_valid_choices(indexed_clips: dict[int, Path]) -> None:
    with pytest.raises(ValueError, match="valid choices: reference"):
        decode_video(indexed_clips[9], 4, H, W, sampling="uniform")
    with pytest.raises(ValueError, match="valid choices: stretch"):
        decode_video(indexed_clips[9], 4, H, W, resize="crop")
    with pytest.raises(ValueError, match="valid choices"):
        frame_indices(9, 4, sampling="random")


@pytest.mark.parametrize("n", [17, 9, 16, 5])
@pytest.mark.parametrize("f", [4, 8])
def test_decode_selects_reference_frames(indexed_clips: dict[int, Path], n: int, f: int) -> None:
    video = decode_video(indexed_clips[n], f, 16, 24)
    assert video.shape == (f, 3, 16, 24)
    assert video.dtype == torch.float32
    assert _decoded_indices(video) == frame_indices(n, f)


def test_decode_range_and_resize_stretch(tmp_path: Path) -> None:
    # Black left half, white right half: after a stretch to a different aspect the extremes
    # survive and values stay inside [-1, 1].
    frames = np.zeros((3, H, W, 3), dtype=np.uint8)
    frames[:, :, W // 2 :] = 255
    path = write_video(tmp_path / "bw.mp4", frames, fps=8)
    video = decode_video(path, 3, 40, 20)
    assert video.shape == (3, 3, 40, 20)
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert video[..., :4].mean() < -0.9 and video[..., -4:].mean() > 0.9


@pytest.mark.parametrize(("codec", "suffix"), [("libx264", ".mp4"), ("png", ".mov")])
def test_decode_grayscale_source(tmp_path: Path, codec: str, suffix: str) -> None:
    # libx264 "gray" decodes as full-range yuvj420p; png "gray" decodes to true 1-channel
    # frames (odd size too): both must come back as 3-channel RGB with the right levels.
    height, width = (H, W) if codec == "libx264" else (H - 1, W - 1)
    frames = _index_frames(6, height, width)[..., 0]  # [F, H, W] single channel
    path = write_video(tmp_path / f"gray{suffix}", frames, fps=8, codec=codec, pix_fmt="gray")
    video = decode_video(path, 3, H, W)
    assert video.shape == (3, 3, H, W)
    assert _decoded_indices(video) == [0, 2, 4]
    assert torch.allclose(video[:, 0], video[:, 1], atol=0.05)  # grey in, grey RGB out


def test_decode_odd_size_source(tmp_path: Path) -> None:
    path = write_video(tmp_path / "odd.mp4", _index_frames(5, 31, 45), fps=8, pix_fmt="yuv444p")
    video = decode_video(path, 5, 16, 16)
    assert video.shape == (5, 3, 16, 16)
    assert _decoded_indices(video) == [0, 1, 2, 3, 4]


def test_first_frame(indexed_clips: dict[int, Path]) -> None:
    frame = first_frame(indexed_clips[9], 8, 12)
    assert frame.shape == (3, 8, 12)
    assert _decoded_indices(frame[None]) == [0]


def test_missing_video(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(DataError, match="nope.mp4.*does not exist"):
        decode_video(path, 4, H, W)
    with pytest.raises(DataError, match="nope.mp4"):
        first_frame(path, H, W)


def test_empty_video(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(DataError, match="empty.mp4.*empty"):
        decode_video(path, 4, H, W)


def test_truncated_video(indexed_clips: dict[int, Path], tmp_path: Path) -> None:
    data = indexed_clips[17].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.mp4") as info:
        decode_video(path, 4, H, W)
    assert info.value.__cause__ is not None  # the PyAV error is chained, not swallowed


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_faststart_video(tmp_path: Path, fraction: float) -> None:
    # With the index at the front, a cut-off file still opens and decodes a prefix; it must
    # not pass as a shorter clip (the reference sampling would repeat its last frame).
    frames = np.random.default_rng(0).integers(0, 256, (17, H, W, 3), dtype=np.uint8)
    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert decode_video(full, 17, H, W).shape == (17, 3, H, W)
    data = full.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataError, match="cut.mp4"):
        decode_video(path, 4, H, W)


def test_garbage_video(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.mp4.*could not be decoded"):
        decode_video(path, 4, H, W)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_load_image_modes(tmp_path: Path, mode: str) -> None:
    rgb = np.zeros((17, 23, 3), dtype=np.uint8)  # odd size on purpose
    rgb[:, 12:] = 255
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb, mode="RGB").convert(mode).save(path)
    image = load_image(path, 16, 24)
    assert image.shape == (3, 16, 24)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image[:, :, :3].mean() < -0.99 and image[:, :, -3:].mean() > 0.99


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.png.*does not exist"):
        load_image(tmp_path / "missing.png", 8, 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all" * 10)
    with pytest.raises(DataError, match="bad.png.*could not be decoded"):
        load_image(bad, 8, 8)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(truncated, 8, 8)
