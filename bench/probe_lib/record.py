"""The probe's record, DIR/probe.json: rewritten after every measurement, so a run cut short keeps what it
measured, with ``"complete": false`` until the end.

Every measurement is one record, a dict whose ``status`` is one of:

* ``ok``: the measurement's own fields (e.g. ms, tflops)
* ``error``: ``error`` holds the exception as ``Type: message`` (the traceback goes to stderr)
* ``unavailable``: ``reason`` says why it cannot run here (no CUDA, a library not installed)
* ``skipped: budget``: the time left (``time_left_s``) was less than it needs (``needs_s``)

and ``at_s``, the seconds since the start when it was recorded; a measurement that ran also has ``wall_s``,
its own wall time (warm-up and compilation included).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

OK, ERROR, UNAVAILABLE, SKIPPED = "ok", "error", "unavailable", "skipped: budget"
MAX_ERROR_CHARS = 4000  # cuDNN / Triton messages can be pages long; the head says what failed


class Unavailable(Exception):
    """Raised by a measurement that cannot run here: recorded as unavailable, not as an error."""


def error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " [...]"


class Probe:
    """The JSON record, the budget, and the rule that a failing measurement never stops the probe."""

    def __init__(
        self,
        out: Path,
        budget_s: float,
        header: dict[str, Any],
        sections: dict[str, str],
        start: float,
        after_error: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(out) / "probe.json"
        self.budget_s = budget_s
        self.start = start
        self.clock = clock
        self.after_error = after_error
        self.data: dict[str, Any] = {
            "complete": False,
            **header,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "summary": {},
            "errors": [],
            "sections": {name: {"title": title, "state": "pending"} for name, title in sections.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def time_left(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def section(self, name: str) -> dict[str, Any]:
        """The section's dict, marked running; measurements are recorded into it (or into dicts under it)."""
        sec = self.data["sections"][name]
        sec["state"] = "running"
        self.write()
        return sec

    def done(self, name: str) -> None:
        self.data["sections"][name]["state"] = "done"
        self.write()

    def measure(self, where: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]],
                need_s: float | None) -> dict[str, Any]:
        """Run fn unless the budget has less than need_s left (None: always run); record into where[key]."""
        left = self.time_left()
        if need_s is not None and left < need_s:
            rec: dict[str, Any] = {"status": SKIPPED, "time_left_s": round(left, 2), "needs_s": need_s}
        else:
            t0 = self.clock()
            try:
                rec = {"status": OK, **fn()}
            except Unavailable as e:
                rec = {"status": UNAVAILABLE, "reason": str(e)}
            except Exception as e:  # noqa: BLE001 -- recorded and printed: the next measurement still runs
                print(f"gpu_probe: {key} failed:", file=sys.stderr)
                traceback.print_exc()
                rec = {"status": ERROR, "error": error_text(e)}
            if rec["status"] == ERROR:
                # Outside the except block: the exception, and the tensors its frames hold, are gone by now.
                self.after_error()
            rec["wall_s"] = round(self.clock() - t0, 3)
        rec["at_s"] = round(self.clock() - self.start, 3)  # when it was recorded: the order measurements ran in
        where[key] = rec
        self.write()
        return rec

    def finish(self, render: Callable[[dict[str, Any]], str]) -> str:
        """Mark the record complete, write it, and write (and return) its Markdown rendering as probe.md."""
        self.data["complete"] = True
        self.write()
        markdown = render(self.data)
        (self.path.parent / "probe.md").write_text(markdown)
        return markdown

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.clock() - self.start, 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)  # atomic: a kill mid-write leaves the previous complete file
