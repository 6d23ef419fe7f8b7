"""Data faults that used to lose or bend data silently: each one is now trained, decoded upright, reported
or refused with a message that names the file and says what to change."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fastcog.data.video as video_module
from fastcog.data.buckets import BucketBatchSampler, assign_bucket
from fastcog.data.frames import frame_indices
from fastcog.data.video import decode_video, first_frame, probe_video, write_video
from tests.media import DISPLAY_TURNS, write_displayed_clip

# --- every clip is trained every epoch, on any number of ranks ------------------------------------


def _old_global_batches(bucket_of: list[int], batch_size: int, seed: int, epoch: int, world_size: int):
    """The sampler's earlier algorithm, kept to prove the one-process order did not change."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(bucket_of), generator=g).tolist()
    per_bucket: dict[int, list[int]] = {}
    for index in order:
        per_bucket.setdefault(bucket_of[index], []).append(index)
    size = batch_size * world_size
    batches = []
    for bucket in sorted(per_bucket):
        members = per_bucket[bucket]
        batches += [members[start : start + size] for start in range(0, len(members), size)]
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle if world_size == 1 or len(batches[i]) == size]


LAYOUTS = {
    "6 clips in 4 buckets": [0, 1, 1, 2, 3, 3],
    "all singletons": [0, 1, 2, 3, 4],
    "one bucket": [0] * 7,
    "uneven": [2, 0, 2, 2, 1, 0, 2, 2, 2, 1, 0],
}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_clip_every_epoch_on_every_rank_count(world_size: int, batch_size: int, layout: str) -> None:
    bucket_of = LAYOUTS[layout]
    size = batch_size * world_size
    for epoch in range(4):
        ranks = [list(BucketBatchSampler(bucket_of, batch_size, seed=7, epoch=epoch, rank=r, world_size=world_size))
                 for r in range(world_size)]
        lengths = {len(batches) for batches in ranks}
        assert len(lengths) == 1  # the same number of steps on every rank
        global_batches = [sum(parts, []) for parts in zip(*ranks, strict=True)]
        assert all(len(b) == size and len({bucket_of[i] for i in b}) == 1 for b in global_batches)
        seen = Counter(i for b in global_batches for i in b)
        assert set(seen) == set(range(len(bucket_of)))  # nothing dropped
        sampler = BucketBatchSampler(bucket_of, batch_size, seed=7, epoch=epoch, rank=0, world_size=world_size)
        counts = sampler.counts()
        assert counts.batches == len(global_batches) == len(sampler)
        assert counts.batches == sum(math.ceil(n / size) for n in Counter(bucket_of).values())
        assert counts.repeats == sum(seen.values()) - len(bucket_of) == sum(counts.repeats_per_rank)
        assert counts.samples_per_rank == sum(len(b) for b in ranks[0])
        # One process at batch size x world_size makes the same global batches with the incomplete ones left
        # short: the rest of each is the fill, and the fill is what counts() reports, rank by rank.
        one = BucketBatchSampler(bucket_of, size, seed=7, epoch=epoch).global_batches()
        assert [g[: len(o)] for g, o in zip(global_batches, one, strict=True)] == one
        for r in range(world_size):
            fill = sum(1 for o in one for k in range(r * batch_size, (r + 1) * batch_size) if k >= len(o))
            assert fill == counts.repeats_per_rank[r]
        for skip in range(len(global_batches) + 1):  # mid-epoch resume on every rank
            resumed = BucketBatchSampler(bucket_of, batch_size, seed=7, epoch=epoch, skip=skip, rank=world_size - 1,
                                         world_size=world_size)
            assert list(resumed) == ranks[-1][skip:] and len(resumed) == len(ranks[-1]) - skip


def test_two_ranks_with_a_singleton_bucket_train_all_six_clips_each_epoch() -> None:
    """2 ranks, batch 1, 4 buckets over 6 clips: every clip in every one of 50 epochs, and the run's start
    line says how many samples each rank trains and how many are repeats."""
    bucket_of = [0, 1, 1, 2, 3, 3]
    for epoch in range(50):
        used = {i for r in range(2) for b in BucketBatchSampler(bucket_of, 1, 0, epoch, rank=r, world_size=2)
                for i in b}
        assert used == set(range(6)), epoch
    line = BucketBatchSampler(bucket_of, 1, 0, rank=0, world_size=2).describe()
    assert "6 samples -> 4 batches per epoch" in line and "trains 4 samples per epoch" in line
    assert "2 of the 8 are repeats" in line and "(per rank: 0, 2)" in line


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_process_order_is_unchanged(batch_size: int, layout: str) -> None:
    bucket_of = LAYOUTS[layout]
    for seed, epoch in [(0, 0), (3, 1), (42, 9)]:
        sampler = BucketBatchSampler(bucket_of, batch_size, seed, epoch)
        assert list(sampler) == _old_global_batches(bucket_of, batch_size, seed, epoch, 1)
        assert sampler.counts().repeats == 0 and sampler.counts().samples_per_rank == len(bucket_of)


@pytest.mark.parametrize("world_size", [2, 3])
def test_full_global_batches_keep_their_order(world_size: int) -> None:
    """With several ranks the full batches come in the order they came before; the filled-up batches take the
    slots where incomplete ones used to be dropped."""
    bucket_of = LAYOUTS["uneven"]
    for epoch in range(5):
        old = _old_global_batches(bucket_of, 1, 5, epoch, world_size)
        new = BucketBatchSampler(bucket_of, 1, 5, epoch, world_size=world_size).global_batches()
        assert [b for b in new if len(set(b)) == world_size and b in old] == old


# --- rotation metadata: decoded upright, bucketed by the displayed shape ----------------------------


def _bright_top_left(n: int, height: int, width: int) -> np.ndarray:
    frames = np.full((n, height, width, 3), 20, np.uint8)
    frames[:, : height // 2, : width // 2] = 235  # marks both "up" and "left"
    return frames


def _quadrant_levels(image: torch.Tensor) -> list[float]:
    """Mean of [3, h, w] in [-1, 1] over its top-left, top-right, bottom-left, bottom-right quadrants."""
    h, w = image.shape[-2] // 2, image.shape[-1] // 2
    return [float(image[:, r : r + h, c : c + w].mean()) for r in (0, h) for c in (0, w)]


@pytest.mark.parametrize("turn", DISPLAY_TURNS)
def test_rotated_clip_decodes_upright_and_buckets_as_displayed(tmp_path: Path, turn: str) -> None:
    path = write_displayed_clip(tmp_path / f"{turn}.mp4", _bright_top_left(3, 48, 32), turn)  # portrait as shown
    with av.open(str(path)) as container:  # real metadata: the decoder hands the display matrix on
        stored = next(container.decode(video=0))
    assert abs(stored.rotation) == {"clockwise": 90, "anticlockwise": 90, "half": 180}[turn]
    assert (stored.height, stored.width) == ((48, 32) if turn == "half" else (32, 48))

    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (3, 48, 32)
    assert assign_bucket(info.num_frames, info.height, info.width, [(3, 32, 48), (3, 48, 32)]) == 1
    for image in [*decode_video(path, 3, 48, 32), *decode_video(path, 2, 24, 16, "uniform", "resize_crop"),
                  first_frame(path, 48, 32)]:
        top_left, *others = _quadrant_levels(image)
        assert top_left > 0.5 and all(level < -0.5 for level in others), (turn, _quadrant_levels(image))


# --- long clips: only the kept frames are converted; a wrong header count changes nothing ----------


def test_only_sampled_frames_are_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "long.mp4", np.random.default_rng(0).integers(0, 256, (40, 32, 48, 3), np.uint8), 8)
    converted = []
    real = video_module._upright_rgb
    monkeypatch.setattr(video_module, "_upright_rgb", lambda p, frame: converted.append(frame) or real(p, frame))
    decode_video(path, 9, 16, 24)
    assert len(converted) == len(set(frame_indices(40, 9))) == 9


@pytest.mark.parametrize("sampling", ["reference", "uniform", "random"])
def test_a_header_count_that_differs_from_the_decoded_one_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampling: str) -> None:
    """Frames are picked from the container's count before decoding; where the decoded count differs (edit
    lists, damaged or variable-rate files), the same draw is redone on the decoded count."""
    path = write_video(tmp_path / "c.mp4", np.random.default_rng(1).integers(0, 256, (17, 32, 48, 3), np.uint8), 8)
    rng = torch.Generator().manual_seed(4)
    expected, after = decode_video(path, 5, 16, 24, sampling, rng=rng), rng.get_state()
    for wrong in (11, 30, 0):
        monkeypatch.setattr(video_module, "_header_frame_count", lambda p, n=wrong: n)
        rng = torch.Generator().manual_seed(4)
        assert torch.equal(decode_video(path, 5, 16, 24, sampling, rng=rng), expected), wrong
        assert torch.equal(rng.get_state(), after)


# --- prepare names what it could not use and what it had to pad ------------------------------------


def _prepare_config(tmp_path: Path, model: Path, root: Path, **data) -> Path:
    raw = {"model": {"path": str(model), "dtype": "fp32"},
           "data": {"data_root": str(root), "num_frames": 9, "height": 32, "width": 48, "prepare_workers": 0,
                    "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"output_dir": str(tmp_path / "out")}, "log": {"report_to": "none", "progress_bar": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_prepare_names_failed_padded_and_still_files(tiny_checkpoint, clips, tmp_path: Path, capsys) -> None:
    """Seven undecodable files (five named, then 'and 2 more'), a 3-frame clip taken up to 9 frames and a
    still image listed as a video: all reported by name, again when a rerun reuses the cache."""
    from fastcog.cli import main

    root = tmp_path / "data"
    (root / "v").mkdir(parents=True)
    write_video(root / "v" / "short.mp4", _bright_top_left(3, 32, 48), 8)
    Image.fromarray(_bright_top_left(1, 32, 48)[0]).save(root / "v" / "still.png")
    bad = [f"v/bad_{i}.mp4" for i in range(7)]
    for name in bad:
        (root / name).write_bytes(b"not a video at all" * 8)
    videos = [str(clips / (clips / "videos.txt").read_text().split()[0]), "v/short.mp4", "v/still.png", *bad]
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    (root / "prompts.txt").write_text("".join(f"caption {i}\n" for i in range(len(videos))))
    cfg = _prepare_config(tmp_path, tiny_checkpoint("cogvideox-5b"), root, max_failed_fraction=0.8)

    for run in ("first", "rerun"):
        capsys.readouterr()
        assert main(["prepare", str(cfg)]) == 0
        out = capsys.readouterr().out
        counts = "3 encoded, 0 reused" if run == "first" else "0 encoded, 3 reused"
        assert f"prepare: {counts}, 7 failed" in out, out
        assert "failed, left out of training (7): " + ", ".join(bad[:5]) + " and 2 more; reasons in " in out, out
        assert "shorter than their bucket, last frame repeated (1): v/short.mp4 (3 of 9 frames)" in out, out
        assert "a single frame (a still image) repeated for the whole clip (1): v/still.png" in out, out

    cfg = _prepare_config(tmp_path, tiny_checkpoint("cogvideox-5b"), root, max_failed_fraction=0.5)
    capsys.readouterr()
    assert main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastcog: error: 7 of 10 clips could not be used"), err
    assert ", ".join(bad[:5]) + " and 2 more; first reason: " in err[0]


# --- a blank caption line: one error with its line number -----------------------------------------


def test_blank_caption_line_is_one_error_naming_the_line(tiny_checkpoint, clips, tmp_path: Path, capsys) -> None:
    from fastcog.cli import main

    root = tmp_path / "data"
    root.mkdir()
    videos = [str(clips / v) for v in (clips / "videos.txt").read_text().split()[:3]]
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    (root / "prompts.txt").write_text("a red square\n\nblue circle\n")
    capsys.readouterr()
    assert main(["prepare", str(_prepare_config(tmp_path, tiny_checkpoint("cogvideox-5b"), root))]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"fastcog: error: {root / 'prompts.txt'} line 2 is blank but videos.txt line 2 is {videos[1]!r}; the files "
        "are matched line by line: write the missing entry on line 2 of prompts.txt, or delete line 2 of "
        "videos.txt to leave that sample out\n")
