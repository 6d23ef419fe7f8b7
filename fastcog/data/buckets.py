"""Resolution buckets and the batch sampler that keeps every batch one shape.

A bucket is (frames, height, width). Each clip goes to the bucket nearest in aspect ratio
(log-ratio distance, so 16:9 vs 4:3 is judged the same from either side), then the longest
bucket that the clip fills without padding, then the nearest length. The sampler forms
*global* batches of batch_size x world_size samples from one bucket and hands each rank its
slice, so N ranks with batch b see the samples one rank with batch N x b sees (a bucket's
incomplete last batch excepted: with several ranks it is filled up with repeats).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple

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


class EpochCounts(NamedTuple):
    """What one epoch of a `BucketBatchSampler` holds; the same every epoch (bucket sizes fix it)."""

    clips: int
    """Distinct samples, each trained exactly once per epoch (plus any repeats)."""
    batches: int
    """Global batches per epoch, on every rank."""
    samples_per_rank: int
    """Samples one rank trains per epoch (batches x batch_size when every batch is full)."""
    repeats: int
    """Repeated samples, over all ranks, that fill incomplete global batches."""
    repeats_per_rank: tuple[int, ...]
    """The same, per rank (the repeats sit at the end of a global batch, so on the last ranks)."""


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-epoch shuffled, one-shape batches; a function of (seed, epoch) only.

    Every sample is trained once per epoch on any number of ranks. In one process a bucket's
    last batch may be smaller than batch_size. With several ranks every rank needs a full
    slice of each global batch (batch_size x world_size samples), so a bucket's incomplete
    last global batch is filled up by repeating samples of the same bucket, taken from the
    start of its shuffled order (other samples than the ones already in the batch, while
    the bucket has enough); `counts()` says how many repeats an epoch holds.

    `skip` drops the first global batches of the epoch (exact mid-epoch resume). The number of
    global batches depends only on the bucket sizes, batch_size and world_size, so it is the
    same on every rank.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int, epoch: int = 0, skip: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.bucket_of = list(bucket_of)
        self.batch_size, self.seed, self.epoch, self.skip = batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def _global_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.bucket_of), generator=g).tolist()
        per_bucket: dict[int, list[int]] = {}
        for index in order:
            per_bucket.setdefault(self.bucket_of[index], []).append(index)
        size = self._global_size()
        batches = []
        for bucket in sorted(per_bucket):
            members = per_bucket[bucket]
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                if self.world_size > 1:
                    batch += [members[k % len(members)] for k in range(size - len(batch))]
                batches.append(batch)
        shuffle = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in shuffle]

    def counts(self) -> EpochCounts:
        size, b = self._global_size(), self.batch_size
        sizes = Counter(self.bucket_of).values()
        batches = sum(math.ceil(n / size) for n in sizes)
        per_rank = [0] * self.world_size
        if self.world_size > 1:
            for n in sizes:
                short = n % size
                if short:  # positions short..size-1 of the last global batch are repeats
                    for r in range(self.world_size):
                        per_rank[r] += max(0, (r + 1) * b - max(short, r * b))
        samples_per_rank = batches * b if self.world_size > 1 else len(self.bucket_of)
        return EpochCounts(len(self.bucket_of), batches, samples_per_rank, sum(per_rank), tuple(per_rank))

    def describe(self) -> str:
        """One line for the start of a run: samples per epoch per rank, and how many are repeats."""
        c = self.counts()
        line = (f"data: {c.clips} samples -> {c.batches} batches per epoch; each of {self.world_size} rank(s) "
                f"trains {c.samples_per_rank} samples per epoch")
        if c.repeats:
            line += (f", {c.repeats} of the {c.samples_per_rank * self.world_size} are repeats filling incomplete "
                     f"global batches (per rank: {', '.join(map(str, c.repeats_per_rank))})")
        return line

    def __iter__(self) -> Iterator[list[int]]:
        b, r = self.batch_size, self.rank
        for batch in self.global_batches()[self.skip :]:
            yield batch[r * b : (r + 1) * b] if self.world_size > 1 else batch

    def __len__(self) -> int:
        return max(0, self.counts().batches - self.skip)
