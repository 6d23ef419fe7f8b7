"""The probe's timer: a warm-up call, then repetitions timed by CUDA events (wall clock on CPU).

The warm-up (on the GPU; the CPU dry run times a single call) takes compilation, cuDNN plan building,
autotune caches and allocator growth out of the timing. On CUDA, one more call estimates the time, then
``rep_ms / estimate`` repetitions (within [min_reps, max_reps]) are queued back to back, each between its
own pair of events, with one synchronisation at the end; the record is their median. L2 is not flushed
between repetitions: a weight small enough for L2 may stay there from one repetition to the next; the
activations (109 MB and more at the real shapes) do not fit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timer:
    device: torch.device
    rep_ms: float
    min_reps: int
    max_reps: int
    warmup: int = 1

    def describe(self) -> str:
        if self.device.type == "cuda":
            return (f"CUDA events: {self.warmup} warm-up call(s), then about {self.rep_ms:g} ms of repetitions "
                    f"({self.min_reps}-{self.max_reps}) queued back to back; median")
        warm = f"{self.warmup} warm-up call(s)" if self.warmup else "no warm-up"
        return f"wall clock: {warm}, {self.min_reps} timed call(s); median"

    def __call__(self, fn: Callable[[], object]) -> dict[str, Any]:
        for _ in range(self.warmup):
            fn()
        self._sync()
        if self.device.type == "cuda":
            reps = max(self.min_reps, min(self.max_reps, int(self.rep_ms / max(self._one(fn), 1e-3))))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for begin, end in events:
                begin.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            times = [begin.elapsed_time(end) for begin, end in events]
        else:
            times = []
            for _ in range(self.min_reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": round(statistics.median(times), 5), "min_ms": round(min(times), 5), "reps": len(times)}

    def _one(self, fn: Callable[[], object]) -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 3)
