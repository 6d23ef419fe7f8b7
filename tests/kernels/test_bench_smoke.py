"""bench/kernel_bench.py --smoke runs end to end (CPU, interpreter) and writes its tables."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU check; GPUs run the real bench")
def test_bench_kernels_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcog_bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)

    rows = bench.main(["--smoke", "--out", str(tmp_path)])

    variants = {(r.case.split()[0], r.variant) for r in rows}
    for v in ("fused", "eager", "compiled", "floor"):
        assert ("lora", v) in variants
    assert ("velocity_mse_loss", "fused") in variants and ("add_noise", "fused") in variants
    loss_cases = sorted({r.case for r in rows if r.case.startswith("velocity_mse_loss")})
    assert loss_cases == ["velocity_mse_loss 1x3x4x6x9 fwd+bwd", "velocity_mse_loss 2x3x4x6x9 fwd+bwd"]
    assert all(r.p50_ms > 0 for r in rows)

    md = (tmp_path / "kernels_smoke.md").read_text()
    assert "NOT performance claims" in md and "torch" in md and "triton" in md and "date" in md
    text = (tmp_path / "kernels_smoke.csv").read_text()
    assert "NOT performance claims" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(body))
    assert len(table) == len(rows)
    assert set(table[0]) >= {"p20_ms", "p50_ms", "p80_ms", "tflops", "gbps", "ratio"}
    assert "## Targets (issue 4) -- smoke run: not a measurement" in md
    assert "fused / base-linear floor = " in md and "(target <= 1.10: " in md and "datasheet" in md


def test_target_checks_say_met_or_not_met(monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcog_bench_kernels_targets", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    case = "lora q/k/v/out 17776x3072->3072 r128 fwd+bwd"
    loss = "velocity_mse_loss 1x13x16x60x90 fwd+bwd"

    def rows(fused_ms: float, eager_ms: float, loss_gbps: float) -> list:
        return [
            bench.Row(case, "fused", 0, fused_ms, 0, 0, 0, 0, "floor"),
            bench.Row(case, "floor", 0, 1.0, 0, 0, 0, 0, "floor"),
            bench.Row(case, "eager", 0, eager_ms, 0, 0, 0, 0, "floor"),
            bench.Row(loss, "fused", 0, 1.0, 0, 0, loss_gbps, 0, "eager"),
        ]

    good = "\n".join(bench.target_checks(rows(1.08, 1.5, 4000.0), 4300.0, 4800.0))
    assert "= 1.080 (target <= 1.10: MET; FLOP ratio 1.125)" in good and "1.39x (target >= 1.3x: MET)" in good
    assert "4000 GB/s of must-move bytes = 83% of the 4800 GB/s datasheet HBM bandwidth (target >= 80%: MET)" in good
    assert "the kernels move 1.75x that: 7000 GB/s" in good and "for scale" not in good
    bad = "\n".join(bench.target_checks(rows(1.2, 1.5, 3000.0), 4300.0, 4800.0))
    assert "= 1.200 (target <= 1.10: NOT MET; FLOP ratio 1.125)" in bad and "1.25x (target >= 1.3x: NOT MET)" in bad
    assert "62% of the 4800 GB/s datasheet HBM bandwidth (target >= 80%: NOT MET)" in bad
    assert "no datasheet figure" in "\n".join(bench.target_checks(rows(1.0, 2.0, 1.0), 10.0, None))
    batch8 = [bench.Row(loss.replace(" 1x", " 8x"), "fused", 0, 1.0, 0, 0, 4000.0, 0, "eager")]
    assert "batch > 1: for scale, the target is stated at batch 1" in bench.target_checks(batch8, 4300.0, 4800.0)[0]
