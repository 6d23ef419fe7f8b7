"""``python tests/eager_python.py ARGS...`` runs ``python ARGS...`` (a script or ``-m module``) with
tests/eager_kernels.py's stand-ins under fastcog's custom ops.

For tests whose subject is a program around the kernels (a benchmark, the GPU suite's stages) and
not the Triton code, which the parity suite runs interpreted: in a subprocess the stand-ins cannot
be patched from the test, so this driver patches them and then runs the program as Python would.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

# The repository root in place of this script's folder, which Python put first: from tests/, the
# name `kernels` would resolve to tests/kernels for every library that looks for a `kernels` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import pytest  # noqa: E402

from tests.eager_kernels import use_eager_kernels  # noqa: E402

use_eager_kernels(pytest.MonkeyPatch())
args = sys.argv[1:]
if args[:1] == ["-m"]:
    sys.argv = [args[1], *args[2:]]
    sys.path.insert(0, "")  # as `python -m`: the working folder first
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    sys.path.insert(0, str(Path(args[0]).resolve().parent))  # as `python script`: the script's folder first
    runpy.run_path(args[0], run_name="__main__")
