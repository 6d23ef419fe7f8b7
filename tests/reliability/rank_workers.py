"""tests/reliability's 2-rank cases: `two_rank_plan`, their runs in the suite's shared 2-rank launch
(conftest.py's two_rank_launch), and the torchrun side (tests.torchrun `Call`s, run on every rank): a
run where one rank alone receives SIGTERM during a chosen step, and a run that records which samples
each rank trained."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

STEPS = 6
# (height, width) of the 6 clips, and the buckets they fall into: 2, 2, 1 and 1 clips.
CLIP_SIZES = [(64, 96), (64, 96), (96, 64), (96, 64), (64, 64), (48, 96)]
BUCKETS = [[9, 64, 96], [9, 96, 64], [9, 64, 64], [9, 48, 96]]
BUCKET_EPOCHS = 2


def two_rank_plan(torchrun_data: dict[str, str], root: Path) -> dict:
    """The runs of tests/reliability/test_two_ranks.py, in order: `full`, an uninterrupted 2-rank run;
    `interrupted`, the same config in another folder with SIGTERM to rank 1 during step 3 (each rank
    writes root/outcome-rank<r>.json); `resumed`, that config run again (resume_from latest); `buckets`,
    6 clips of CLIP_SIZES in BUCKETS trained BUCKET_EPOCHS epochs (root/samples-rank<r>.json)."""
    from tests.media import make_mixed_dataset
    from tests.torchrun import Call, raw_config, write_config

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
    return {
        "full": full,
        "interrupted": Call("tests.reliability.rank_workers:interrupted", [str(interrupted), "1", "3"]),
        "resumed": resumed,
        "buckets": Call("tests.reliability.rank_workers:record_samples", [str(write_config(buckets, "buckets"))]),
    }


def interrupted(config_path: str, signal_rank: str, step: str) -> None:
    """Run `config_path` with SIGTERM sent to rank `signal_rank` during step `step`; each rank writes
    what ended its run to outcome-rank<r>.json beside the config."""
    import fastcog.trainer
    from fastcog.config import load_config
    from fastcog.parallel import current_world
    from fastcog.stop import Preempted

    rank = current_world().rank
    real, calls = fastcog.trainer.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if rank == int(signal_rank) and len(calls) == int(step):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    fastcog.trainer.train_step = train_step
    try:
        fastcog.trainer.train(load_config(config_path))
        outcome = {"preempted": False}
    except Preempted as stop:
        outcome = {"preempted": True, "message": str(stop)}
    finally:
        fastcog.trainer.train_step = real
    (Path(config_path).parent / f"outcome-rank{rank}.json").write_text(json.dumps(outcome))


def record_samples(config_path: str) -> None:
    """Train `config_path`, writing the batches of dataset indices this rank trained, in order, to
    samples-rank<r>.json (the sampler's output: what the DataLoader reads)."""
    from fastcog.config import load_config
    from fastcog.data.buckets import BucketBatchSampler
    from fastcog.parallel import current_world
    from fastcog.trainer import train

    batches, real = [], BucketBatchSampler.__iter__

    def iterate(self):
        for batch in real(self):
            batches.append([int(i) for i in batch])
            yield batch

    BucketBatchSampler.__iter__ = iterate
    try:
        train(load_config(config_path))
    finally:
        BucketBatchSampler.__iter__ = real
    rank = current_world().rank
    (Path(config_path).parent / f"samples-rank{rank}.json").write_text(json.dumps(batches))
