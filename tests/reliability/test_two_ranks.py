"""The multi-rank faults, torchrun with 2 ranks on CPU (gloo), in one launch (tests/torchrun.py's
launch_many; the rank-side code is in rank_workers.py):

* SIGTERM reaches rank 1 only, during step 3: both ranks stop after step 3 (the flag is all-reduced
  at the step boundary, so rank 0 never waits in a collective), checkpoint-3 is written, and the
  resumed run's losses equal an uninterrupted 2-rank run's, bit for bit.
* 6 clips in 4 buckets, two of them holding a single clip, 2 ranks at batch 1: every clip is
  trained in every epoch (a bucket's incomplete global batch is filled from the same bucket).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastcog.checkpoint import list_checkpoints
from tests.media import make_mixed_dataset
from tests.torchrun import Call, launch_many, metrics, raw_config, write_config

STEPS = 6
# (height, width) of the 6 clips, and the buckets they fall into: 2, 2, 1 and 1 clips.
CLIP_SIZES = [(64, 96), (64, 96), (96, 64), (96, 64), (64, 64), (48, 96)]
BUCKETS = [[9, 64, 96], [9, 96, 64], [9, 64, 64], [9, 48, 96]]
BUCKET_EPOCHS = 2


@pytest.fixture(scope="module")
def launch(torchrun_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_ranks")
    sections = {"train": {"train_steps": STEPS}, "checkpoint": {"every_steps": 4, "resume_from": "latest"}}
    full = raw_config(torchrun_data, root / "full", ranks=2, **sections)
    resumed = raw_config(torchrun_data, root / "resumed", ranks=2, **sections)
    interrupted = write_config(resumed, "interrupted")

    clips = make_mixed_dataset(root / "bucket_clips", [{"num_frames": 9, "height": h, "width": w, "fps": 8}
                                                       for h, w in CLIP_SIZES])
    data = {**torchrun_data, "clips": str(clips), "cache": str(clips / "cache")}
    # 4 global batches per epoch (one per bucket), accumulation 2: 2 steps per epoch.
    buckets = raw_config(data, root / "buckets", ranks=2, train={"train_steps": 2 * BUCKET_EPOCHS},
                         checkpoint={"every_steps": 0})
    buckets["data"]["buckets"] = BUCKETS
    outcomes = launch_many({
        "full": full,
        "interrupted": Call("tests.reliability.rank_workers:interrupted", [str(interrupted), "1", "3"]),
        "resumed": resumed,
        "buckets": Call("tests.reliability.rank_workers:record_samples", [str(write_config(buckets, "buckets"))]),
    }, root / "launch", nproc=2, cpu_only=True)
    assert all(o.status == 0 for o in outcomes.values()), {n: o.stderr[-2000:] for n, o in outcomes.items()}
    return root


def test_two_ranks_stop_together_when_one_is_signalled(launch):
    stops = [json.loads((launch / f"outcome-rank{r}.json").read_text()) for r in (0, 1)]
    assert stops[0]["preempted"] and stops[1]["preempted"]
    assert stops[0]["message"].startswith("stopped on a signal to another rank after step 3: checkpoint-3")
    assert stops[1]["message"].startswith("stopped on SIGTERM after step 3: checkpoint-3")
    assert [s for s, _ in list_checkpoints(launch / "resumed")] == [3, 4, STEPS]
    assert [r["loss"] for r in metrics(launch / "resumed")] == [r["loss"] for r in metrics(launch / "full")]


def test_every_clip_is_trained_every_epoch_with_singleton_buckets(launch):
    per_rank = [json.loads((launch / f"samples-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4 * BUCKET_EPOCHS  # the same number of batches
    for epoch in range(BUCKET_EPOCHS):
        seen = {i for rank in per_rank for batch in rank[4 * epoch:4 * (epoch + 1)] for i in batch}
        assert seen == set(range(len(CLIP_SIZES))), f"epoch {epoch}: trained {sorted(seen)}"
