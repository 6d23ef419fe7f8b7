"""What every module of the benchmark shares: the repository root, the results folder, the CPU
note, the exit statuses and UsageError."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"
CPU_NOTE = ("CPU run: not a performance claim. It checks that the benchmark and every path run and that "
            "the loss parity holds; CPU step times say nothing about GPU speed.")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3


class UsageError(Exception):
    """A bad option or option combination: reported on one line, exit status 2."""
