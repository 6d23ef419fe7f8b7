"""Bucket assignment and the one-shape, resumable, rank-sharded batch sampler."""

from __future__ import annotations

import pytest

from fastcog.data.buckets import BucketBatchSampler, assign_bucket

BUCKETS = [(17, 64, 96), (9, 64, 96), (17, 96, 64), (9, 64, 64)]


@pytest.mark.parametrize(
    ("clip", "expected"),
    [
        ((30, 480, 720), 0),  # landscape 3:2, long enough for 17 frames
        ((12, 480, 720), 1),  # landscape, too short for 17: the 9-frame bucket, no padding
        ((5, 480, 720), 1),  # shorter than every landscape bucket: the nearest length
        ((40, 720, 480), 2),  # portrait
        ((40, 500, 500), 3),  # square: only one square bucket
        ((40, 480, 854), 0),  # 16:9 is nearer 3:2 than 1:1
    ],
)
def test_assign_bucket(clip, expected):
    assert assign_bucket(*clip, BUCKETS) == expected


def test_every_batch_has_one_bucket_and_every_sample_appears_once():
    bucket_of = [i % 3 for i in range(23)]
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=5)
    batches = list(sampler)
    assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert len(sampler) == len(batches)


def test_order_depends_on_seed_and_epoch_only():
    bucket_of = [0] * 10 + [1] * 10
    a = list(BucketBatchSampler(bucket_of, 3, seed=1, epoch=0))
    assert a == list(BucketBatchSampler(bucket_of, 3, seed=1, epoch=0))
    assert a != list(BucketBatchSampler(bucket_of, 3, seed=1, epoch=1))
    assert a != list(BucketBatchSampler(bucket_of, 3, seed=2, epoch=0))


def test_skip_resumes_mid_epoch():
    bucket_of = [0, 1] * 9
    full = list(BucketBatchSampler(bucket_of, 2, seed=3, epoch=4))
    assert list(BucketBatchSampler(bucket_of, 2, seed=3, epoch=4, skip=3)) == full[3:]


def test_ranks_split_each_global_batch():
    """2 ranks x batch 2 see the batches of 1 rank x batch 4, split in halves; a bucket's incomplete last
    batch is filled up with repeats of the same bucket's samples, so every rank gets a full slice."""
    bucket_of = [i % 2 for i in range(20)]
    one = list(BucketBatchSampler(bucket_of, 4, seed=0, world_size=1))
    r0 = list(BucketBatchSampler(bucket_of, 2, seed=0, rank=0, world_size=2))
    r1 = list(BucketBatchSampler(bucket_of, 2, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(one) == 6
    for a, b, batch in zip(r0, r1, one, strict=True):
        assert (a + b)[: len(batch)] == batch
        fill = (a + b)[len(batch) :]  # 2 of the 10 in each bucket are repeats: others of its bucket
        assert {bucket_of[i] for i in fill} <= {bucket_of[batch[0]]} and not set(fill) & set(batch)
