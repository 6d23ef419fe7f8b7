"""Stopping cleanly on a signal: finish the step, checkpoint, exit with EXIT_PREEMPTED.

SLURM preemption and time limits send SIGTERM (and, with `--signal`, SIGUSR1 ahead of the
limit); Ctrl-C sends SIGINT. Inside the training loop the first of these only raises a flag;
the loop finishes the optimizer step in progress, writes a checkpoint and raises `Preempted`,
which the CLI turns into exit code EXIT_PREEMPTED. A second signal exits at once, by the
signal's default action, for when saving itself hangs. A repeat within DUPLICATE_WINDOW_S of the
first is the same request delivered twice, not a second one: a scheduler signals every process
of a job step, and torchrun forwards what it receives to its workers as well.

Under torchrun a signal may reach only some ranks, so the ranks agree at every step boundary
through one all-reduce (max) of the flag: all stop after the same step, and none is left
waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fastcog.errors import FastcogError

if TYPE_CHECKING:
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 1.0
EXIT_PREEMPTED = 75
"""sysexits' EX_TEMPFAIL: stopped on request with a checkpoint written; run the same command to resume."""


class Preempted(FastcogError):
    """The run stopped on a signal after writing a checkpoint."""


class StopRequest:
    """This process's stop flag, set by STOP_SIGNALS while `handling()` is active."""

    def __init__(self, duplicate_window_s: float = DUPLICATE_WINDOW_S) -> None:
        self.signal_name: str | None = None
        self.duplicate_window_s = duplicate_window_s
        self._first_at = 0.0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if time.monotonic() - self._first_at < self.duplicate_window_s:
                return
            print(f"fastcog: second signal ({name}): exiting now, without a checkpoint", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name, self._first_at = name, time.monotonic()
        print(f"fastcog: {name} received: finishing this step, then writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    @contextmanager
    def handling(self) -> Iterator[StopRequest]:
        """Install the handlers (main thread only; elsewhere signals keep their usual effect)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def message(self, step: int, output_dir: Path, resumes_latest: bool) -> str:
        how = "run the same command" + ("" if resumes_latest else " with --set checkpoint.resume_from=latest")
        return (f"stopped on {self.signal_name or 'a signal to another rank'} after step {step}: checkpoint-{step} "
                f"is in {output_dir}; {how} to continue")

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether any rank was asked to stop (collective under torchrun: call on every rank)."""
        if not distributed:
            return self.signal_name is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.signal_name is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process decides when to stop. A terminal's Ctrl-C
    reaches the whole process group; a worker that died of it would fail the step the main
    process is finishing. Workers exit with the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
