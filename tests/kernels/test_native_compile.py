"""Every fused kernel launch of a real-shape step compiles natively for sm_90, without a GPU.

The parity suite runs the kernels under the Triton interpreter, which never compiles them.
bench/kernel_compile.py compiles each launch of a CogVideoX-shape forward + backward (with
its real specialization) of the bf16 and the FP8-base LoRA linear for an H100/H200 target and
checks registers, spills, shared memory, wgmma (FP8 operands for the FP8 GEMMs) and software
pipelining. Here it runs in a subprocess, because the kernels must be defined without
TRITON_INTERPRET, which conftest sets for this process.
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
FUSED = "17776x3072x3072+128"  # y and dx: the only launches that are not rank-sized
LOSS_KERNELS = {"_add_noise_kernel", "_vmse_partial_kernel", "_sum_partials_kernel", "_vmse_backward_kernel"}
FP8_KERNELS = {"_quant_lora_kernel", "_fp8_lora_mm_kernel"}
# The FP8 GEMM's operands (forward, then dx) per recipe: dy is e5m2 under tensorwise.
FP8_MMA = {"tensorwise": ["e4m3 x e4m3", "e5m2 x e4m3"], "rowwise": ["e4m3 x e4m3", "e4m3 x e4m3"]}


# One process for every use of the tool here (each process pays for importing torch and Triton):
# it prints the autotune lists of the kernels, then runs bench/kernel_compile.py's main once per
# argument list, each with its stdout and exit code (the second run reuses the first's compiles).
DRIVER = """
import contextlib, importlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("fastcog_bench_kernel_compile", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tool
spec.loader.exec_module(tool)
lora = importlib.import_module("fastcog.kernels.lora_linear")
fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")
label = lambda c: tool.config_label(c.kwargs, c.num_warps, c.num_stages)
labels = {"fused_mm": [label(c) for c in lora._CONFIGS], "rank": label(lora._RANK_CONFIG),
          "_quant_lora_kernel": [label(c) for c in fp8._QUANT_CONFIGS],
          "_fp8_lora_mm_kernel": [label(c) for c in fp8._MM_CONFIGS]}
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
    """{"labels": the kernels' GPU autotune lists, "clean" / "too_big": (exit code, stdout, CSV rows, out dir)}
    for the tool run with the kernels' own configs and with fused_mm's TOO_BIG only, both
    `--arch 90 --cases ci --check`."""
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
    labels = compiled["labels"]

    gemm = [r for r in rows if r["kernel"] == "_fused_mm_kernel" and r["case"].endswith("bf16")]
    # Every config the autotuner would time, for every launch of the step: the whole list for the two
    # fused launches, the rank config alone for the rank-sized ones (S', G', dA, dB).
    for shape in set(LORA_LAUNCHES):
        want = labels["fused_mm"] if shape == FUSED else [labels["rank"]]
        got = sorted(r["config"] for r in gemm if r["shape"] == shape)
        assert got == sorted(want * LORA_LAUNCHES.count(shape)), (shape, got)
    assert {r["kernel"] for r in rows} == {"_fused_mm_kernel"} | FP8_KERNELS | LOSS_KERNELS
    for r in rows:
        assert r["compiled"] == "True" and r["problems"] == "", r
        assert int(r["spill_bytes"]) == 0 and 0 < int(r["regs"]) <= 255, r
        assert 0 <= int(r["smem_bytes"]) <= 232_448, r
    for r in rows:
        if r["kernel"] not in LOSS_KERNELS:
            assert int(r["mma"]) > 0 and r["pipelined"] == "True", r  # wgmma, cp.async K loop
            # K = 3072 and the LoRA K (r = 128) are whole tiles; dA / dB reduce over 17,776 tokens (masked).
            even = r["even_k"].split(",")
            assert ("EVEN_K" in even) != r["shape"].endswith("x17776"), r
            if r["kernel"] == "_fused_mm_kernel" and r["shape"].endswith("+128"):
                assert "EVEN_K2" in even, r
    for recipe, mma in FP8_MMA.items():
        case = [r for r in rows if r["case"].endswith(f"fp8 {recipe}")]
        for kernel in FP8_KERNELS:  # forward, then backward: each with the kernel's whole list
            got = [r["config"] for r in case if r["kernel"] == kernel]
            assert got == labels[kernel] * 2, (recipe, kernel, got)
        mm = [r for r in case if r["kernel"] == "_fp8_lora_mm_kernel"]
        n = len(labels["_fp8_lora_mm_kernel"])
        for r, operands in zip(mm, [mma[0]] * n + [mma[1]] * n, strict=True):
            # The FP8 product on FP8 wgmma, the LoRA K segment on bf16 wgmma.
            assert f"{operands}: " in r["mma_types"] and "bf16 x bf16: " in r["mma_types"], r
            assert r["even_k"] == "EVEN_K,EVEN_R", r
        quant = [r["shape"].split()[-1] for r in case if r["kernel"] == "_quant_lora_kernel"]
        assert quant == ["e4m3"] * (len(quant) // 2) + [mma[1][:4]] * (len(quant) // 2)  # x, then dy
    (md_file,) = out.glob("kernel_compile_sm90_triton*.md")
    md = md_file.read_text()
    assert "triton" in md and f"{len(rows)} launches, 0 with problems" in md


@pytest.mark.slow
def test_a_config_that_cannot_fit_is_reported(compiled):
    code, stdout, rows, _ = compiled["too_big"]
    assert code == 1, stdout[-2000:]
    gemm = [r for r in rows if r["kernel"] == "_fused_mm_kernel"]
    # --configs replaces fused_mm's list, each config on every launch (no pruning to the rank config); the FP8
    # step, whose fused_mm launches are the bf16 step's, is left out.
    assert sorted(r["shape"] for r in gemm) == sorted(LORA_LAUNCHES) and {r["config"] for r in gemm} == {TOO_BIG}
    assert all("shared memory" in r["problems"] for r in gemm), gemm
    assert {r["kernel"] for r in rows} - {"_fused_mm_kernel"} == LOSS_KERNELS
    assert all(r["problems"] == "" for r in rows if r["kernel"] != "_fused_mm_kernel")
    assert "lora_linear_fp8 launches skipped: --configs" in stdout
