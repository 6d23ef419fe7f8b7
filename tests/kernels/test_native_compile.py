"""Every fused kernel launch of a real-shape step compiles natively for sm_90, without a GPU.

The parity suite runs the kernels under the Triton interpreter, which never compiles them.
bench/kernel_compile.py compiles each launch of a CogVideoX-shape forward + backward (with
its real specialization) for an H100/H200 target and checks registers, spills, shared
memory, wgmma and software pipelining. Here it runs in a subprocess, because the kernels
must be defined without TRITON_INTERPRET, which conftest sets for this process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "bench" / "kernel_compile.py"

# 17,776 tokens x 3072 -> 3072, rank 128: S' = x A.T, y = x W.T + S' B.T, G' = dy B,
# dx = dy W + G' A, dA = G'.T x, dB = dy.T S' (dW is never computed for a frozen base).
LORA_LAUNCHES = ["17776x128x3072", "17776x3072x3072+128", "17776x128x3072", "17776x3072x3072+128",
                 "128x3072x17776", "3072x128x17776"]  # fmt: skip
LOSS_KERNELS = {"_add_noise_kernel", "_vmse_partial_kernel", "_sum_partials_kernel", "_vmse_backward_kernel"}


# One process for every use of the tool here (each process pays for importing torch and Triton
# and for compiling the loss kernels again): it prints the autotune list of lora_linear, then runs
# bench/kernel_compile.py's main once per argument list, each with its stdout and exit code.
DRIVER = """
import contextlib, importlib, importlib.util, io, json, sys
lora = importlib.import_module("fastcog.kernels.lora_linear")
labels = [f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}:{c.num_warps}:{c.num_stages}"
          for c in lora._CONFIGS]
spec = importlib.util.spec_from_file_location("fastcog_bench_kernel_compile", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tool
spec.loader.exec_module(tool)
runs = []
for argv in json.loads(sys.argv[2]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tool.main(argv)
    runs.append({"returncode": code, "stdout": out.getvalue()})
print(json.dumps({"labels": labels, "runs": runs}))
"""
# 256 x 256 x 128 tiles, 4 stages: 4 x (256x128 + 128x256) bf16 = 512 KiB of shared memory.
TOO_BIG = "256x256x128:8:4"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """{"labels": lora_linear's GPU autotune list, "clean" / "too_big": (exit code, stdout, CSV rows)} for
    the tool run with the kernel's own configs and with TOO_BIG only, both `--arch 90 --cases ci --check`."""
    import json

    outs = {"clean": tmp_path_factory.mktemp("clean"), "too_big": tmp_path_factory.mktemp("too_big")}
    extra = {"clean": [], "too_big": ["--configs", TOO_BIG]}
    argvs = [["--arch", "90", "--cases", "ci", "--check", "--out", str(outs[k]), *extra[k]] for k in outs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(TOOL), json.dumps(argvs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    result = {"labels": report["labels"]}
    for (name, out), run in zip(outs.items(), report["runs"], strict=True):
        tables = sorted(out.glob("kernel_compile_sm90_triton*.csv"))
        rows = list(csv.DictReader(tables[0].open())) if tables else []
        result[name] = (run["returncode"], run["stdout"], rows, out)
    return result


@pytest.mark.slow
def test_autotune_configs_compile_cleanly_for_sm90(compiled):
    code, stdout, rows, out = compiled["clean"]
    assert code == 0, stdout[-3000:]

    lora_module = compiled["labels"]
    gemm = [r for r in rows if r["kernel"] == "_fused_mm_kernel"]
    # Every autotune config was compiled for every launch of the step, and nothing else.
    assert {r["config"] for r in gemm} == set(lora_module)
    for label in lora_module:
        shapes = sorted(r["shape"] for r in gemm if r["config"] == label)
        assert shapes == sorted(LORA_LAUNCHES), (label, shapes)
    assert {r["kernel"] for r in rows} - {"_fused_mm_kernel"} == LOSS_KERNELS
    for r in rows:
        assert r["compiled"] == "True" and r["problems"] == "", r
        assert int(r["spill_bytes"]) == 0 and 0 < int(r["regs"]) <= 255, r
        assert 0 <= int(r["smem_bytes"]) <= 232_448, r
    for r in gemm:
        assert int(r["mma"]) > 0 and r["pipelined"] == "True", r  # wgmma, cp.async K loop
    (md_file,) = out.glob("kernel_compile_sm90_triton*.md")
    md = md_file.read_text()
    assert "triton" in md and f"{len(rows)} launches, 0 with problems" in md


@pytest.mark.slow
def test_a_config_that_cannot_fit_is_reported(compiled):
    code, stdout, rows, _ = compiled["too_big"]
    assert code == 1, stdout[-2000:]
    gemm = [r for r in rows if r["kernel"] == "_fused_mm_kernel"]
    assert len(gemm) == len(LORA_LAUNCHES) and {r["config"] for r in gemm} == {TOO_BIG}
    assert all("shared memory" in r["problems"] for r in gemm), gemm
    assert all(r["problems"] == "" for r in rows if r["kernel"] != "_fused_mm_kernel")
