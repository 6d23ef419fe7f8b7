"""Decoding: shapes, range, which source frames are sampled, odd inputs, and bad files."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fastcog.data.frames import frame_indices, resize_frames
from fastcog.data.video import VideoInfo, decode_video, first_frame, load_image, probe_video, write_video
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
    return {n: write_video(root / f"n{n}.mp4", _index_frames(n), fps=8) for n in (1, 2, 5, 9, 16, 17)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
    with pytest.raises(ValueError, match="valid choices: random, reference, uniform"):
        decode_video(indexed_clips[9], 4, H, W, sampling="linear")
    with pytest.raises(ValueError, match="valid choices: resize_crop, stretch"):
        decode_video(indexed_clips[9], 4, H, W, resize="crop")
    with pytest.raises(ValueError, match="valid choices"):
        frame_indices(9, 4, sampling="shuffle")


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


def test_decode_grayscale_new_modes(tmp_path: Path) -> None:
    path = write_video(tmp_path / "gray.mov", _index_frames(7, 31, 45)[..., 0], fps=8, codec="png", pix_fmt="gray")
    video = decode_video(path, 3, 16, 16, sampling="uniform", resize="resize_crop")
    assert video.shape == (3, 3, 16, 16)
    assert _decoded_indices(video) == [0, 3, 6]
    video = decode_video(path, 3, 16, 16, sampling="random", resize="resize_crop", rng=_gen(0))
    assert _decoded_indices(video) == frame_indices(7, 3, "random", rng=_gen(0))


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


# --- uniform / random sampling ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [
        (17, 4, [0, 5, 11, 16]),  # linspace 0, 5.33, 10.67, 16
        (17, 9, [0, 2, 4, 6, 8, 10, 12, 14, 16]),  # spread out, unlike reference's 0..8
        (9, 4, [0, 3, 5, 8]),  # 0, 2.67, 5.33, 8
        (6, 3, [0, 3, 5]),  # 2.5 rounds up (not to even)
        (16, 16, list(range(16))),
        (100, 1, [0]),
        (2, 2, [0, 1]),
        (5, 8, [0, 1, 2, 3, 4, 4, 4, 4]),  # short clip: the reference padding
        (1, 3, [0, 0, 0]),
    ],
)
def test_frame_indices_uniform(n: int, f: int, expected: list[int]) -> None:
    assert frame_indices(n, f, "uniform") == expected


@pytest.mark.parametrize("n", range(1, 40))
@pytest.mark.parametrize("f", [1, 2, 3, 8, 13])
def test_frame_indices_uniform_matches_linspace(n: int, f: int) -> None:
    indices = frame_indices(n, f, "uniform")
    assert len(indices) == f
    if n >= f:
        exact = np.linspace(0, n - 1, f)
        assert np.all(np.abs(np.array(indices) - exact) <= 0.5)
        assert indices[0] == 0 and indices[-1] == (n - 1 if f > 1 else 0)
        assert all(b > a for a, b in zip(indices, indices[1:]))  # no frame used twice


@pytest.mark.parametrize(("n", "f"), [(17, 4), (9, 4), (30, 7), (8, 8), (40, 13), (100, 9)])
def test_frame_indices_random_window(n: int, f: int) -> None:
    stride = n // f
    starts = set()
    for seed in range(200):
        indices = frame_indices(n, f, "random", rng=_gen(seed))
        start = indices[0]
        assert indices == [start + stride * k for k in range(f)]  # the reference stride
        assert 0 <= start <= n - stride * f  # the window fits
        starts.add(start)
    assert starts == set(range(n - stride * f + 1))  # every start is reachable


def test_frame_indices_random_reproducible() -> None:
    a = [frame_indices(100, 9, "random", rng=_gen(1234)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    # One generator advances: consecutive draws come from its stream, the same each time.
    g1, g2 = _gen(7), _gen(7)
    assert [frame_indices(100, 9, "random", g1) for _ in range(5)] == [
        frame_indices(100, 9, "random", g2) for _ in range(5)
    ]
    starts = {frame_indices(100, 9, "random", rng=_gen(seed))[0] for seed in range(10)}
    assert len(starts) > 1  # seeds differ


def test_random_short_clip_pads_like_reference() -> None:
    assert frame_indices(5, 8, "random", rng=_gen(0)) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert frame_indices(1, 2, "random", rng=_gen(0)) == [0, 0]


def test_random_needs_rng(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch.Generator"):
        frame_indices(9, 4, "random")
    # Checked before decoding: a missing file gives the rng error, not a DataError.
    with pytest.raises(ValueError, match="torch.Generator"):
        decode_video(tmp_path / "not_there.mp4", 4, H, W, sampling="random")


@pytest.mark.parametrize("n", [17, 9, 5, 2, 1])
@pytest.mark.parametrize("f", [4, 8])
def test_decode_uniform_selects_frames(indexed_clips: dict[int, Path], n: int, f: int) -> None:
    video = decode_video(indexed_clips[n], f, 16, 24, sampling="uniform")
    assert video.shape == (f, 3, 16, 24)
    assert _decoded_indices(video) == frame_indices(n, f, "uniform")


@pytest.mark.parametrize("n", [17, 9, 2])
def test_decode_random_selects_frames(indexed_clips: dict[int, Path], n: int) -> None:
    decoded = []
    for seed in (0, 1, 2, 3):
        video = decode_video(indexed_clips[n], 4, 16, 24, sampling="random", rng=_gen(seed))
        decoded.append(_decoded_indices(video))
        assert decoded[-1] == frame_indices(n, 4, "random", rng=_gen(seed))
        again = decode_video(indexed_clips[n], 4, 16, 24, sampling="random", rng=_gen(seed))
        assert torch.equal(video, again)
    if n == 17:  # 17 // 4 = 4, window 16, start 0 or 1: four seeds see both here
        assert {d[0] for d in decoded} == {0, 1}


def test_default_decode_is_reference(indexed_clips: dict[int, Path]) -> None:
    default = decode_video(indexed_clips[17], 4, 16, 24)
    explicit = decode_video(indexed_clips[17], 4, 16, 24, sampling="reference", resize="stretch", rng=_gen(0))
    assert torch.equal(default, explicit)


def _write_vfr(path: Path, frames: np.ndarray, pts_ms: list[int]) -> Path:
    """A variable-frame-rate clip: frame i is shown at pts_ms[i] milliseconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for array, pts in zip(frames, pts_ms):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("sampling", ["reference", "uniform"])
def test_decode_variable_frame_rate(tmp_path: Path, sampling: str) -> None:
    # Frames are indexed in decode order whatever their timestamps.
    path = _write_vfr(tmp_path / "vfr.mp4", _index_frames(9), [0, 33, 66, 200, 210, 500, 520, 900, 1000])
    video = decode_video(path, 4, H, W, sampling=sampling)
    assert _decoded_indices(video) == frame_indices(9, 4, sampling)
    info = probe_video(path)
    assert info.num_frames == 9
    assert 5 < info.fps < 15  # about 9 frames per second on average


# --- resize_crop ---------------------------------------------------------------------------------


def _marker_frames(n: int, height: int, width: int, side: int) -> np.ndarray:
    """Black frames with a white side x side square in the centre."""
    frames = np.zeros((n, height, width, 3), dtype=np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frames[:, top : top + side, left : left + side] = 255
    return frames


def _bbox(image: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive, of the bright pixels of [3, h, w] in [-1, 1]."""
    mask = image.mean(dim=0) > 0.0  # above mid-grey
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@pytest.mark.parametrize(
    ("src", "side", "dst", "box"),
    [
        # wide 2:1 source into a square: height fits (x1), 16 columns cut from each side
        ((32, 64), 16, (32, 32), (8, 24, 8, 24)),
        # tall source, downscaled x0.5 then rows cropped
        ((64, 32), 16, (16, 16), (4, 12, 4, 12)),
        # same aspect: plain resize
        ((32, 48), 16, (16, 24), (4, 12, 8, 16)),
        # square source upscaled x2 to cover a wide target: 8 rows cut top and bottom
        ((16, 16), 8, (16, 32), (0, 16, 8, 24)),
    ],
)
def test_resize_crop_keeps_aspect_and_centre(
    src: tuple[int, int], side: int, dst: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    frames = torch.from_numpy(_marker_frames(1, *src, side=side)).permute(0, 3, 1, 2).float()
    out = resize_frames(frames, *dst, resize="resize_crop")
    assert out.shape == (1, 3, *dst)
    assert _bbox(out[0] / 127.5 - 1.0) == box


@pytest.mark.parametrize(
    ("src", "dst"), [((31, 45), (16, 16)), ((17, 23), (40, 20)), ((5, 7), (9, 13)), ((9, 9), (9, 9)), ((1, 1), (4, 6))]
)
def test_resize_crop_odd_sizes(src: tuple[int, int], dst: tuple[int, int]) -> None:
    frames = torch.rand(2, 3, *src) * 255
    assert resize_frames(frames, *dst, resize="resize_crop").shape == (2, 3, *dst)


def test_decode_resize_crop_marker_not_stretched(tmp_path: Path) -> None:
    # A 16:9-ish clip with a centred square, cropped to a square: still a centred square.
    # With stretch the same square comes out about half as wide as it is tall.
    path = write_video(tmp_path / "marker.mp4", _marker_frames(3, 36, 64, side=18), fps=8)
    video = decode_video(path, 2, 32, 32, resize="resize_crop")
    assert video.shape == (2, 3, 32, 32)
    top, bottom, left, right = _bbox(video[0])
    assert abs((bottom - top) - 16) <= 1 and abs((right - left) - 16) <= 1
    assert abs((top + bottom) / 2 - 16) <= 0.5 and abs((left + right) / 2 - 16) <= 0.5

    stretched = decode_video(path, 2, 32, 32)
    top, bottom, left, right = _bbox(stretched[0])
    assert (right - left) < 0.7 * (bottom - top)

    frame = first_frame(path, 32, 32, resize="resize_crop")
    assert torch.allclose(frame, video[0], atol=1e-6)


def test_load_image_resize_crop(tmp_path: Path) -> None:
    path = tmp_path / "marker.png"
    Image.fromarray(_marker_frames(1, 32, 64, side=16)[0]).save(path)
    image = load_image(path, 16, 16, resize="resize_crop")
    assert image.shape == (3, 16, 16)
    assert _bbox(image) == (4, 12, 4, 12)


# --- probe_video -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "height", "width", "fps", "suffix", "pix_fmt"),
    [
        (17, 32, 48, 8.0, ".mp4", "yuv420p"),
        (1, 16, 16, 1.0, ".mp4", "yuv420p"),
        (2, 31, 45, 29.97, ".mp4", "yuv444p"),  # odd size, NTSC rate
        (9, 48, 16, 12.5, ".mov", "yuv420p"),  # tall
        (6, 32, 48, 24.0, ".mkv", "yuv420p"),  # no frame count in the header: packets counted
    ],
)
def test_probe_video(
    tmp_path: Path, n: int, height: int, width: int, fps: float, suffix: str, pix_fmt: str
) -> None:
    path = write_video(tmp_path / f"clip{suffix}", _index_frames(n, height, width), fps=fps, pix_fmt=pix_fmt)
    info = probe_video(path)
    assert info == VideoInfo(num_frames=n, fps=pytest.approx(fps, rel=1e-3), height=height, width=width)
    # The probed count is the decoded count (what the sampling modes see).
    assert decode_video(path, n, height, width).shape[0] == n
    with pytest.raises(AttributeError):
        info.num_frames = 3  # type: ignore[misc]  # frozen


def test_probe_video_errors(tmp_path: Path, indexed_clips: dict[int, Path]) -> None:
    with pytest.raises(DataError, match="gone.mp4.*does not exist"):
        probe_video(tmp_path / "gone.mp4")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(DataError, match="empty.mp4.*empty"):
        probe_video(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.mp4.*could not be read") as info:
        probe_video(garbage)
    assert info.value.__cause__ is not None
    data = indexed_clips[17].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.mp4"):
        probe_video(cut)


def test_probe_video_audio_only(tmp_path: Path) -> None:
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(DataError, match="sound.wav has no video stream"):
        probe_video(path)
    with pytest.raises(DataError, match="sound.wav has no video stream"):
        decode_video(path, 2, H, W)
