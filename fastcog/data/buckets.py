"""Resolution buckets and the batch sampler that keeps every batch one shape.

A bucket is (frames, height, width). Each clip goes to the bucket nearest in aspect ratio
(log-ratio distance, so 16:9 vs 4:3 is judged the same from either side), then the longest
bucket that the clip fills without padding, then the nearest length. The sampler forms
*global* batches of batch_size x world_size samples from one bucket and hands each rank its
slice, so N ranks with batch b see exactly the samples one rank with batch N x b sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

Bucket = tuple[int, int, int]  # (frames, height, width)


def assign_bucket(num_frames: int, height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket for a clip of num_frames frames of height x width pixels."""
    if not buckets:
        raise ValueError("no buckets given")
    clip_ar = math.log(width / height)

    def key(i: int) -> tuple[float, int, int]:
        f, h, w = buckets[i]
        ar_dist = round(abs(clip_ar - math.log(w / h)), 3)  # ties within 0.1% are ties
        pads = 0 if f <= num_frames else 1
        return ar_dist, pads, abs(num_frames - f)

    return min(range(len(buckets)), key=key)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-epoch shuffled, one-shape batches; a function of (seed, epoch) only.

    `skip` drops the first global batches of the epoch (exact mid-epoch resume: the count of
    global batches consumed does not depend on the number of ranks). With more than one rank
    an incomplete final global batch of a bucket is dropped, so every rank gets a full slice.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int, epoch: int = 0, skip: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.bucket_of = list(bucket_of)
        self.batch_size, self.seed, self.epoch, self.skip = batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.bucket_of), generator=g).tolist()
        per_bucket: dict[int, list[int]] = {}
        for index in order:
            per_bucket.setdefault(self.bucket_of[index], []).append(index)
        size = self.batch_size * self.world_size
        batches = []
        for bucket in sorted(per_bucket):
            members = per_bucket[bucket]
            batches += [members[start : start + size] for start in range(0, len(members), size)]
        shuffle = torch.randperm(len(batches), generator=g).tolist()
        # Drop after shuffling, so the order of the full batches does not depend on world_size.
        return [batches[i] for i in shuffle if self.world_size == 1 or len(batches[i]) == size]

    def __iter__(self) -> Iterator[list[int]]:
        b, r = self.batch_size, self.rank
        for batch in self.global_batches()[self.skip :]:
            yield batch[r * b : (r + 1) * b] if self.world_size > 1 else batch

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.skip)
