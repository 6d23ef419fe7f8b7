"""One CPU dry run of bench/gpu_suite.py per pytest session (tests/conftest.py's `gpu_suite_dry_run`).

Its outputs serve three modules: tests/test_gpu_suite.py (the suite: stage order, files, the cut,
the summary) and tests/test_bench_throughput.py (the benchmark's three runs in it: the headline's
reference and fastcog paths, the selective row and every leave-one-out row against the reused
reference). One run instead of two saves one benchmark process and its imports (~10 s of the
2-core machine's test time). The stages run under tests/eager_python.py: the kernels' stand-ins
under fastcog's custom ops, since the subject is the programs around them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CUT_STAGE = "gputests"
"""Cut at CUT_AFTER_S: pytest's start-up alone takes longer. (Collecting the GPU tier is what the dry run
would do; the regular test run collects those tests anyway.)"""
CUT_AFTER_S = 1.0
ABLATION_ROWS = "leave-one-out"


@dataclass
class SuiteRun:
    done: subprocess.CompletedProcess
    out: Path
    report: dict
    """suite.json"""


def run_dry_suite(out: Path) -> SuiteRun:
    python = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'tests' / 'eager_python.py'))}"
    done = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), "--dry-run", "--budget-s", "400",
         "--stage-timeout", f"{CUT_STAGE}={CUT_AFTER_S:g}", f"--ablation-rows={ABLATION_ROWS}", "--python", python],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert (out / "suite.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return SuiteRun(done, out, json.loads((out / "suite.json").read_text()))
