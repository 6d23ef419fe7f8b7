"""bench/kernel_bench.py --smoke runs end to end (CPU, interpreter) and writes its tables."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_bench.py"


# The smoke shapes of bench/kernel_bench.py: M tokens, rank r, LoRA (label, K, N), latent shapes.
SMOKE_M, SMOKE_RANK = 37, 8
SMOKE_LORA = [("q/k/v/out", 48, 48), ("ff up", 48, 96)]
SMOKE_LATENTS = ["1x3x4x6x9", "2x3x4x6x9"]
BF16_BYTES = 2


def expected_work(case: str) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of a smoke case, counted here from its GEMMs and tensors (bf16)."""
    m, r, e = SMOKE_M, SMOKE_RANK, BF16_BYTES
    for label, k, n in SMOKE_LORA:
        if case.startswith(f"lora {label} "):
            # forward: x W.T, x A.T, S' B.T; backward (frozen base): dy W, dy B, G' A, G'.T x, dy.T S'
            fwd = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n
            bwd = 2 * m * n * k + 2 * m * n * r + 2 * m * r * k + 2 * r * m * k + 2 * n * m * r
            # read x, W, b, A, B, write y and S'; backward: read dy, x, W, A, B, S', write dx, dA, dB
            fwd_bytes = e * (m * k + n * k + n + r * k + n * r + m * n + m * r)
            bwd_bytes = e * (m * n + m * k + n * k + r * k + n * r + m * r + m * k + r * k + n * r)
            if case.endswith("fwd+bwd"):
                return fwd + bwd, fwd_bytes + bwd_bytes
            return fwd, fwd_bytes
    numel = 1
    for size in case.split()[1].split("x"):
        numel *= int(size)
    if case.startswith("add_noise"):  # two multiplies and an add per element; read z0, eps, write x_t
        return 3 * numel, 3 * e * numel
    return 12 * numel, 4 * e * numel  # the loss forward + backward: read v, x_t, z0, write dv


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU check; GPUs run the real bench")
def test_bench_kernels_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcog_bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)

    # aot_eager: the `compiled` rows still go through torch.compile, without inductor's C++ build.
    rows = bench.main(["--smoke", "--out", str(tmp_path), "--compile-backend", "aot_eager"])

    # Every case with every variant, exactly once: 2 LoRA shapes x (fwd, fwd+bwd) x 4 variants, and
    # 2 latent shapes x (add_noise, loss) x 3 variants.
    lora_cases = [f"lora {label} {SMOKE_M}x{k}->{n} r{SMOKE_RANK} {part}"
                  for label, k, n in SMOKE_LORA for part in ("fwd", "fwd+bwd")]
    latent_cases = [f"{op} {shape}{suffix}" for shape in SMOKE_LATENTS
                    for op, suffix in (("add_noise", ""), ("velocity_mse_loss", " fwd+bwd"))]
    expected = {(c, v) for c in lora_cases for v in ("fused", "eager", "compiled", "floor")}
    expected |= {(c, v) for c in latent_cases for v in ("fused", "eager", "compiled")}
    assert len(rows) == len(expected) == 28 and {(r.case, r.variant) for r in rows} == expected
    by = {(r.case, r.variant): r for r in rows}
    for r in rows:
        assert 0 < r.p20_ms <= r.p50_ms <= r.p80_ms, r
        assert r.baseline == ("floor" if r.case.startswith("lora") else "eager"), r
        assert r.ratio == pytest.approx(r.p50_ms / by[(r.case, r.baseline)].p50_ms, rel=1e-12), r
        flops, nbytes = expected_work(r.case)
        assert r.tflops == pytest.approx(flops / (r.p50_ms * 1e-3) / 1e12, rel=1e-12), r
        assert r.gbps == pytest.approx(nbytes / (r.p50_ms * 1e-3) / 1e9, rel=1e-12), r

    md = (tmp_path / "kernels_smoke.md").read_text()
    assert "NOT performance claims" in md and "torch" in md and "triton" in md and "date" in md
    text = (tmp_path / "kernels_smoke.csv").read_text()
    assert "NOT performance claims" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(body))
    assert [(t["case"], t["variant"]) for t in table] == [(r.case, r.variant) for r in rows]
    for t, r in zip(table, rows, strict=True):  # the file holds the run's values (as rounded there)
        assert (float(t["p50_ms"]), float(t["ratio"]), t["baseline"]) == (
            pytest.approx(r.p50_ms, abs=5e-5), pytest.approx(r.ratio, abs=5e-4), r.baseline)
    assert md.count("\n| lora ") + md.count("\n| add_noise ") + md.count("\n| velocity_mse_loss ") == len(rows)
    assert "## Targets -- smoke run: not a measurement" in md
    # The target lines are computed from these rows: one pair per q/k/v/out fwd+bwd case, one per loss case.
    case = f"lora q/k/v/out {SMOKE_M}x48->48 r{SMOKE_RANK} fwd+bwd"
    floor_ratio = by[(case, "fused")].p50_ms / by[(case, "floor")].p50_ms
    speedup = by[(case, "eager")].p50_ms / by[(case, "fused")].p50_ms
    assert f"- {case}: fused / base-linear floor = {floor_ratio:.3f} (target <= 1.10: " in md
    assert f"- {case}: peft-style eager / fused = {speedup:.2f}x (target >= 1.3x: " in md
    assert "datasheet" in md and md.count("GB/s of must-move bytes") == len(SMOKE_LATENTS)


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
