"""Synthetic datasets: real, decodable, distinct, learnable clips; idempotent creation."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcog.data.listfile import read_list_dataset, read_metadata_dataset
from fastcog.data.synthetic import make_synthetic_dataset
from fastcog.data.video import decode_video, first_frame, load_image, probe_video, write_video
from fastcog.errors import DataError
from tests.media import make_mixed_dataset, truncate_file

F, H, W = 9, 32, 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", 4, F, H, W, with_images=True)


def test_layout_and_listfile_round_trip(dataset: Path) -> None:
    samples = read_list_dataset(dataset, "prompts.txt", "videos.txt", "images.txt")
    assert len(samples) == 4
    assert (dataset / "videos.txt").read_text().splitlines()[0] == "videos/clip_000.mp4"
    assert (dataset / "images.txt").read_text().splitlines()[0] == "images/clip_000.png"
    captions = [s.caption for s in samples]
    assert len(set(captions)) == 4
    assert all(c.startswith("a ") and "square moving" in c for c in captions)
    assert not [p.name for p in dataset.rglob(".*tmp*")]  # no temp files left behind


def test_clips_decode_and_move(dataset: Path) -> None:
    samples = read_list_dataset(dataset, "prompts.txt", "videos.txt", "images.txt")
    clips = [decode_video(s.video, F, H, W) for s in samples]
    for sample, clip in zip(samples, clips, strict=True):
        assert clip.shape == (F, 3, H, W)
        assert -1.0 <= clip.min() and clip.max() <= 1.0
        assert (clip[0] - clip[-1]).abs().mean() > 0.05  # the square moved
        # The image list holds each clip's first frame.
        image = load_image(sample.image, H, W)
        assert (image - first_frame(sample.video, H, W)).abs().mean() < 0.05
    assert (clips[0] - clips[1]).abs().mean() > 0.05  # clips differ


def test_idempotent(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "ds", 2, F, H, W)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    for p in files:  # backdate so a rewrite would be visible even on coarse clocks
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    make_synthetic_dataset(root, 2, F, H, W)
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in files)
    assert stamps  # sanity: something was written

    # An incomplete dataset (a run killed half-way) is rebuilt.
    (root / "videos" / "clip_001.mp4").unlink()
    make_synthetic_dataset(root, 2, F, H, W)
    assert (root / "videos" / "clip_001.mp4").is_file()
    assert decode_video(root / "videos" / "clip_001.mp4", F, H, W).shape == (F, 3, H, W)

    # Different parameters rebuild too.
    make_synthetic_dataset(root, 3, F, H, W)
    assert len((root / "videos.txt").read_text().splitlines()) == 3


def test_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", 3, 5, 16, 16, seed=1)
    b = make_synthetic_dataset(tmp_path / "b", 3, 5, 16, 16, seed=1)
    assert (a / "prompts.txt").read_text() == (b / "prompts.txt").read_text()
    va = decode_video(a / "videos" / "clip_002.mp4", 5, 16, 16)
    vb = decode_video(b / "videos" / "clip_002.mp4", 5, 16, 16)
    assert torch.equal(va, vb)


def test_rejects_odd_dataset_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        make_synthetic_dataset(tmp_path / "ds", 1, 3, 31, 48)


def test_write_video_odd_size(tmp_path: Path) -> None:
    frames = np.full((3, 31, 45, 3), 128, dtype=np.uint8)
    with pytest.raises(ValueError, match="yuv420p needs even frame sizes, got 31x45"):
        write_video(tmp_path / "odd.mp4", frames, fps=8)
    assert not list(tmp_path.iterdir())
    path = write_video(tmp_path / "odd.mp4", frames, fps=8, pad=True)
    assert decode_video(path, 3, 31, 45).shape == (3, 3, 31, 45)


def test_write_video_mpeg4_fallback(tmp_path: Path) -> None:
    frames = np.full((4, H, W, 3), 200, dtype=np.uint8)
    path = write_video(tmp_path / "m.mp4", frames, fps=12.5, codec="mpeg4")
    video = decode_video(path, 4, H, W)
    assert video.shape == (4, 3, H, W)
    assert abs(float(video.mean()) - (200 / 127.5 - 1)) < 0.05


# --- mixed datasets and corrupt files --------------------------------------------------------

MIXED_SPECS = [
    {"num_frames": 9, "height": 32, "width": 48, "fps": 8},
    {"num_frames": 17, "height": 48, "width": 32, "fps": 24},  # tall
    {"num_frames": 2, "height": 31, "width": 45, "fps": 29.97},  # odd size, 2 frames
    {"num_frames": 1, "height": 16, "width": 16, "fps": 1},  # a single frame
    {"num_frames": 5, "height": 16, "width": 64, "fps": 12.5},  # very wide
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mixed_dataset(tmp_path_factory.mktemp("mixed") / "ds", MIXED_SPECS, seed=3)


def test_mixed_dataset_layout_and_formats_agree(mixed: Path) -> None:
    listed = read_list_dataset(mixed, "prompts.txt", "videos.txt")
    assert len(listed) == len(MIXED_SPECS)
    assert len({s.caption for s in listed}) == len(listed)
    assert all("," in s.caption for s in listed)  # so the CSV really has quoted fields
    assert read_metadata_dataset(mixed, "metadata.csv") == listed
    assert read_metadata_dataset(mixed, "metadata.jsonl") == listed
    assert '"' in (mixed / "metadata.csv").read_text()


def test_mixed_dataset_clips_match_specs(mixed: Path) -> None:
    samples = read_list_dataset(mixed, "prompts.txt", "videos.txt")
    for spec, sample in zip(MIXED_SPECS, samples, strict=True):
        info = probe_video(sample.video)
        assert (info.num_frames, info.height, info.width) == (spec["num_frames"], spec["height"], spec["width"])
        assert info.fps == pytest.approx(spec["fps"], rel=1e-3)
        # Every odd input decodes into the training shape in every mode.
        for sampling, resize in [("reference", "stretch"), ("uniform", "resize_crop"), ("random", "resize_crop")]:
            rng = torch.Generator().manual_seed(0)
            clip = decode_video(sample.video, 9, 16, 24, sampling, resize, rng=rng)
            assert clip.shape == (9, 3, 16, 24)
            assert -1.0 <= clip.min() and clip.max() <= 1.0


def test_mixed_dataset_idempotent_and_validated(tmp_path: Path) -> None:
    specs = MIXED_SPECS[:2]
    root = make_mixed_dataset(tmp_path / "ds", specs)
    video = root / "videos" / "clip_000.mp4"
    os.utime(video, ns=(1_000_000_000, 1_000_000_000))
    make_mixed_dataset(root, specs)
    assert video.stat().st_mtime_ns == 1_000_000_000
    make_mixed_dataset(root, specs[:1])  # other specs: rewritten
    assert len((root / "videos.txt").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="missing \\['fps'\\]"):
        make_mixed_dataset(tmp_path / "bad", [{"num_frames": 3, "height": 16, "width": 16}])
    with pytest.raises(ValueError, match="at least one"):
        make_mixed_dataset(tmp_path / "bad", [])


def test_truncate_file(mixed: Path, tmp_path: Path) -> None:
    source = mixed / "videos" / "clip_000.mp4"
    size = source.stat().st_size
    copy = truncate_file(source, 0.5, tmp_path / "sub" / "cut.mp4")
    assert copy.stat().st_size == size // 2
    assert source.stat().st_size == size  # the source is kept
    assert copy.read_bytes() == source.read_bytes()[: size // 2]
    for fn in (probe_video, lambda p: decode_video(p, 4, 16, 16)):
        with pytest.raises(DataError, match="cut.mp4"):
            fn(copy)

    in_place = tmp_path / "in_place.mp4"
    in_place.write_bytes(source.read_bytes())
    assert truncate_file(in_place, 0.25) == in_place
    assert in_place.stat().st_size == int(size * 0.25)
    with pytest.raises(ValueError, match="fraction"):
        truncate_file(in_place, 1.0)
