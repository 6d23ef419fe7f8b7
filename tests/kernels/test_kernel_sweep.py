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
    configs_before, split_before = list(lora._fused_mm_tuned.configs), lora.pick_split_k

    result = sweep.main(["--smoke", "--out", str(tmp_path)])

    # The module's autotune list and split-K heuristic are restored afterwards.
    assert lora._fused_mm_tuned.configs == configs_before and lora.pick_split_k is split_before
    candidates = {f"{m}x{n}x{k}:{w}:{s}" for m, n, k, w, s in sweep.SMOKE_CANDIDATES}
    launches: dict[str, set[str]] = {}
    for t in result["timings"]:
        launches.setdefault(t.launch, set()).add(t.config)
        assert t.p50_ms > 0
    # Forward (S', y), backward (G' shares S''s key here; dx, dA, dB): every launch saw every candidate.
    assert len(launches) >= 5 and all(cfgs == candidates for cfgs in launches.values()), launches
    assert set(result["recommended"]) <= candidates and result["recommended"]
    assert [s for _, s, _ in result["splits"]] == ["heuristic", "1", "4"]

    md = (tmp_path / "kernel_sweep_smoke.md").read_text()
    assert "NOT performance claims" in md and "recommended `_CONFIGS`" in md and "triton" in md
    body = [x for x in (tmp_path / "kernel_sweep_smoke.csv").read_text().splitlines() if not x.startswith("#")]
    assert len(list(csv.DictReader(body))) == len(result["timings"])
