"""One stage command under a deadline, its output copied line by line to the console, the suite
log and the stage's own log as it is printed (so a killed suite keeps everything up to the kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

KILL_GRACE_S = 10.0
"""After the deadline a command gets SIGTERM, then this long to write its last results, then SIGKILL."""


@dataclass
class CommandResult:
    returncode: int | None
    """None when the command was cut at its deadline."""
    seconds: float


class Tee:
    """Writes each line to several open files and flushes, so every file is current when a run is killed."""

    def __init__(self, *files: TextIO) -> None:
        self.files = list(files)
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            for f in self.files:
                f.write(text)
                f.flush()


def run_command(argv: list[str], *, deadline: float, tee: Tee, env: dict[str, str], cwd: Path) -> CommandResult:
    """Run argv until it exits or `deadline` (time.monotonic()) passes; its stdout and stderr go to `tee`.

    The command runs in its own process group, so the cut reaches its children too (torchrun, pytest
    workers, compile workers)."""
    start = time.monotonic()
    tee.write(f"$ {' '.join(argv)}\n")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=cwd, start_new_session=True, errors="replace")
    reader = threading.Thread(target=_copy_lines, args=(proc, tee), daemon=True)
    reader.start()
    cut = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        cut = True
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return CommandResult(None if cut else proc.returncode, time.monotonic() - start)


def _copy_lines(proc: subprocess.Popen, tee: Tee) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        tee.write(line)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it exited between the timeout and the signal
        pass
