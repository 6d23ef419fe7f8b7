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


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "90", "--cases", "ci", "--check", "--out", str(tmp_path), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tables = sorted(tmp_path.glob("kernel_compile_sm90_triton*.csv"))
    rows = list(csv.DictReader(tables[0].open())) if tables else []
    return proc, rows


@pytest.mark.slow
def test_autotune_configs_compile_cleanly_for_sm90(tmp_path):
    proc, rows = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lora_module = _lora_config_labels()
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
    (md_file,) = tmp_path.glob("kernel_compile_sm90_triton*.md")
    md = md_file.read_text()
    assert "triton" in md and f"{len(rows)} launches, 0 with problems" in md


@pytest.mark.slow
def test_a_config_that_cannot_fit_is_reported(tmp_path):
    # 256 x 256 x 128 tiles, 4 stages: 4 x (256x128 + 128x256) bf16 = 512 KiB of shared memory.
    proc, rows = _run(tmp_path, "--configs", "256x256x128:8:4")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    gemm = [r for r in rows if r["kernel"] == "_fused_mm_kernel"]
    assert len(gemm) == len(LORA_LAUNCHES)
    assert all("shared memory" in r["problems"] for r in gemm), gemm
    assert all(r["problems"] == "" for r in rows if r["kernel"] != "_fused_mm_kernel")


def _lora_config_labels() -> list[str]:
    """The GPU autotune list of lora_linear, read in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import importlib; m = importlib.import_module('fastcog.kernels.lora_linear');"
        "print('\\n'.join(f\"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}:"
        '{c.num_warps}:{c.num_stages}" for c in m._CONFIGS))'
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()
