"""The multi-rank faults, torchrun with 2 ranks on CPU (gloo), in the suite's shared 2-rank launch
(conftest.py's two_rank_launch; the runs and the rank-side code are in rank_workers.py):

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
from tests.reliability.rank_workers import BUCKET_EPOCHS, CLIP_SIZES, STEPS
from tests.torchrun import metrics


@pytest.fixture(scope="module")
def launch(two_rank_launch) -> Path:
    """The folder of this module's runs (rank_workers.py's two_rank_plan) in the suite's shared 2-rank
    launch (conftest.py), all of which finished."""
    root, outcomes = two_rank_launch["reliability"]
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
