"""The training progress display: a tqdm bar on a terminal, plain lines everywhere else.

tqdm redraws its bar with carriage returns, which a terminal overwrites in place but a file
keeps: a SLURM log (or any redirected stderr) gets one ever-growing line per run, hundreds of
kilobytes of `\\r`-separated redraws that `less` and `grep` cannot read. When stderr is not a
terminal the trainer prints one ordinary line every `line_every(total)` steps instead.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINES_PER_RUN = 20
"""About how many progress lines a whole run writes when stderr is not a terminal."""


class StepProgress(Protocol):
    def step(self, loss: float, lr: float, grad_norm: float) -> None: ...
    def write(self, message: str) -> None: ...
    def close(self) -> None: ...


def line_every(total: int) -> int:
    """Steps between two progress lines: total / LINES_PER_RUN, rounded up to 1, 2 or 5 x 10^k.

    There is no per-run logging interval in the config (metrics.jsonl holds every step), so the
    cadence follows the run's length: ~20 lines say how a run is going at any length without
    burying the log (a 100k-step run does not write 100k lines). Round numbers (every 50, 500,
    ...) make the lines easy to find and line up with checkpoint intervals, which are usually round.
    """
    raw = max(1, math.ceil(total / LINES_PER_RUN))
    scale = 10 ** (len(str(raw)) - 1)
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)


class BarProgress:
    """The tqdm bar (or nothing, when disabled), as before: the latest step's values in its postfix."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled,
                        dynamic_ncols=True)

    def step(self, loss: float, lr: float, grad_norm: float) -> None:
        # One redraw per step: the postfix without a refresh, then update() draws both.
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{grad_norm:.3f}", refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


class LineProgress:
    """One line every `every` steps to `stream`, and at this process's first step (it shows the
    run got going, and how long the warm-up took) and the last.

    The loss printed is the mean since the previous line: one step's diffusion loss depends on its
    random timestep and swings by tens of percent, so single values 50 steps apart hide the trend.
    lr and the gradient norm are the latest step's, as on the bar. The rate and the ETA count from
    the end of the first step, whose one-off warm-up (allocation, compilation) would skew them.
    """

    def __init__(self, total: int, initial: int, every: int, stream: TextIO,
                 clock: Callable[[], float] = time.perf_counter, desc: str = "training") -> None:
        self.total, self.done, self.every, self.stream, self.desc = total, initial, every, stream, desc
        self.clock = clock
        self.t0, self.first_step = self.clock(), initial + 1
        self.t_first = self.t0
        self.losses: list[float] = []

    def step(self, loss: float, lr: float, grad_norm: float) -> None:
        self.done += 1
        self.losses.append(loss)
        if self.done % self.every and self.done not in (self.first_step, self.total):
            return
        now = self.clock()
        if self.done == self.first_step:
            self.t_first = now
            pace = f"first step {now - self.t0:.2f} s (warm-up included)"
        else:
            rate = (self.done - self.first_step) / (now - self.t_first) if now > self.t_first else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            pace = f"{_rate(rate)}  elapsed {_clock(now - self.t0)}  eta {_clock(eta)}"
        width = len(str(self.total))
        self.write(f"{self.desc}: step {self.done:>{width}}/{self.total} ({100 * self.done / self.total:3.0f}%)  "
                   f"loss {sum(self.losses) / len(self.losses):.4f} (mean of {len(self.losses)})  lr {lr:.2e}  "
                   f"grad_norm {grad_norm:.3f}  {pace}")
        self.losses = []

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        self.stream.flush()


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def step_progress(total: int, initial: int, enabled: bool, stream: TextIO | None = None) -> StepProgress:
    """The bar on a terminal (or when disabled: tqdm's write still prints), lines on anything else."""
    stream = sys.stderr if stream is None else stream
    if enabled and not is_terminal(stream):
        return LineProgress(total, initial, line_every(total), stream)
    return BarProgress(total, initial, enabled)


def iter_progress(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool,
                  stream: TextIO | None = None) -> Iterator[T]:
    """`items` with a tqdm bar on a terminal, or a line every line_every(total) items elsewhere
    (fastcog prepare: encoding a real dataset's clips can take hours of a SLURM job)."""
    stream = sys.stderr if stream is None else stream
    if not enabled or is_terminal(stream):
        yield from tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
        return
    every, t0 = line_every(total), time.perf_counter()
    for n, item in enumerate(items, 1):
        yield item
        if n % every == 0 or n == total:
            elapsed = time.perf_counter() - t0
            print(f"{desc}: {n}/{total} {unit}s ({100 * n / total:3.0f}%)  elapsed {_clock(elapsed)}  "
                  f"eta {_clock(elapsed / n * (total - n))}", file=stream, flush=True)


def _rate(steps_per_s: float) -> str:
    if steps_per_s <= 0:
        return "- s/step"
    return f"{steps_per_s:.2f} step/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.2f} s/step"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
