"""bench/kernels.py --smoke runs end to end (CPU, interpreter) and writes its tables."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


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
    assert all(r.p50_ms > 0 for r in rows)

    md = (tmp_path / "kernels_smoke.md").read_text()
    assert "NOT performance claims" in md and "torch" in md and "triton" in md and "date" in md
    text = (tmp_path / "kernels_smoke.csv").read_text()
    assert "NOT performance claims" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(body))
    assert len(table) == len(rows)
    assert set(table[0]) >= {"p20_ms", "p50_ms", "p80_ms", "tflops", "gbps", "ratio"}
