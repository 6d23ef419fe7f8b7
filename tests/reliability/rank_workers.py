"""The torchrun side of tests/reliability's 2-rank cases (tests.torchrun `Call`s, run on every rank):
a run where one rank alone receives SIGTERM during a chosen step, and a run that records which
samples each rank trained."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


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
