"""bench/kernel_sweep.py: the set cover that picks the config list, and a smoke run (CPU)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SWEEP = Path(__file__).resolve().parents[2] / "bench" / "kernel_sweep.py"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcog_bench_kernel_sweep", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


def test_cover_picks_fewest_configs_within_tolerance(monkeypatch):
    sweep = _load(monkeypatch)
    timings = {
        "a": {"x": 1.00, "y": 1.02, "z": 2.0},
        "b": {"x": 1.50, "y": 1.00, "z": 1.0},
        "c": {"x": 3.00, "y": 2.00, "z": 1.0},
    }
    # y covers a (within 3%) and b; c needs z; z alone also covers b. Two configs are needed.
    chosen = sweep.cover(timings, 0.03)
    assert len(chosen) == 2 and "z" in chosen
    for launch, by_cfg in timings.items():
        assert min(by_cfg[c] for c in chosen) <= min(by_cfg.values()) * 1.03, launch
    # With no tolerance y no longer covers a: x is needed for a, z for b and c.
    assert sorted(sweep.cover(timings, 0.0)) == ["x", "z"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU check; GPUs run the real sweep")
def test_sweep_smoke_times_every_candidate_on_every_launch(tmp_path, monkeypatch):
    sweep = _load(monkeypatch)
    lora = importlib.import_module("fastcog.kernels.lora_linear")
    fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")
    tuners = [lora._fused_mm_tuned, fp8._quant_lora_tuned, fp8._fp8_lora_mm_tuned]
    before = [(list(t.configs), t.early_config_prune) for t in tuners]
    split_before = lora.pick_split_k

    result = sweep.main(["--smoke", "--out", str(tmp_path)])

    # The modules' autotune lists, pruning and split-K heuristic are restored afterwards.
    assert [(t.configs, t.early_config_prune) for t in tuners] == before and lora.pick_split_k is split_before
    labels = {name: {sweep.label(c) for c in sweep.configs(cands, kind)} for name, cands, kind in [
        ("fused_mm", sweep.SMOKE_CANDIDATES, "mm"), ("quantise", sweep.SMOKE_QUANT_CANDIDATES, "quant"),
        ("fp8 gemm", sweep.SMOKE_FP8_MM_CANDIDATES, "fp8")]}  # fmt: skip
    labels["fused_mm rank-sized"] = labels["fused_mm"]
    launches: dict[str, dict[str, set[str]]] = {}
    for t in result["timings"]:
        launches.setdefault(t.kernel, {}).setdefault(t.launch, set()).add(t.config)
        assert t.p50_ms > 0
    # Every launch saw every candidate of its kernel: fused_mm's y and dx; the rank-sized S', G', dA, dB;
    # the FP8 base (tensorwise) quantising x (e4m3) and dy (e5m2), its forward and dx GEMMs.
    assert {k: len(v) for k, v in launches.items()} == {"fused_mm": 2, "fused_mm rank-sized": 4, "quantise": 2,
                                                        "fp8 gemm": 2}  # fmt: skip
    for kernel, by_launch in launches.items():
        assert all(cfgs == labels[kernel] for cfgs in by_launch.values()), (kernel, by_launch)
    assert [x.split()[-1] for x in launches["quantise"]] == ["e4m3", "e5m2"]
    assert [x.split(" ", 1)[1] for x in launches["fp8 gemm"]] == ["e4m3 x e4m3 fast", "e5m2 x e4m3"]
    lists = {"fused_mm": "_CONFIGS", "fused_mm rank-sized": "_RANK_CONFIG", "quantise": "_QUANT_CONFIGS",
             "fp8 gemm": "_MM_CONFIGS"}  # fmt: skip
    assert set(result["recommended"]) == set(lists.values())
    for kernel, name in lists.items():
        assert result["recommended"][name] and set(result["recommended"][name]) <= labels[kernel]
    assert [s for _, s, _ in result["splits"]] == ["heuristic", "1", "4"]

    md = (tmp_path / "kernel_sweep_smoke.md").read_text()
    assert "NOT performance claims" in md and "triton" in md
    assert all(f"recommended `{name}`" in md for name in lists.values())
    body = [x for x in (tmp_path / "kernel_sweep_smoke.csv").read_text().splitlines() if not x.startswith("#")]
    assert len(list(csv.DictReader(body))) == len(result["timings"])
