"""bench/gpu_probe.py in its CPU dry run, in process: probe.json holds every section in order with its
fields and ends complete, probe.md renders it, a measurement that raises is recorded with its error while
the probe goes on, and measurements the budget cannot fit are recorded as skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "bench" / "gpu_probe.py"
SECTIONS = ["environment", "sdpa_choice", "attention", "gemm", "lora_linear", "copy"]
SHAPES = ["48->48", "48->96", "96->48"]  # the dry run's (K, N), in the order of the real ones
BACKENDS = ["cudnn", "flash", "efficient", "fa3", "flash_attn"]
SDPA_NAMES = {"MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE"}


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("fastcog_bench_gpu_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def run(probe, out: Path, *args: str) -> dict:
    probe.main(["--out", str(out), "--tiny", *args])
    return json.loads((out / "probe.json").read_text())


def records(data: dict) -> list[tuple[str, dict]]:
    """Every measurement record (a dict with a status) under the sections, with its path."""
    found = []

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            if "status" in value:
                found.append((path, value))
            else:
                for key, sub in value.items():
                    walk(f"{path}/{key}", sub)

    for name, sec in data["sections"].items():
        walk(name, sec)
    return found


def assert_timed(rec: dict, *fields: str) -> None:
    assert rec["status"] == "ok", rec
    for field in ("ms", "reps", *fields):
        assert isinstance(rec[field], int | float) and rec[field] >= 0, (field, rec)


def test_dry_run_records_every_section_in_order(probe, tmp_path, capsys):
    data = run(probe, tmp_path)
    assert data["complete"] is True and data["dry_run"] is True
    assert data["note"] == "CPU dry run: not a measurement"
    assert list(data["sections"]) == SECTIONS
    assert all(sec["state"] == "done" for sec in data["sections"].values())
    recorded_at = [rec["at_s"] for _, rec in records(data)]
    assert recorded_at == sorted(recorded_at)  # measured in the order of the file: most important first
    s = data["sections"]

    env = s["environment"]["facts"]
    assert env["status"] == "ok"
    for field in ("torch", "cuda", "cudnn", "triton", "gpu", "sm_count", "memory_gib", "date_utc"):
        assert field in env, field

    for model in ("cogvideox-5b", "cogvideox-2b"):
        assert s["sdpa_choice"][model]["status"] == "ok"
        assert s["sdpa_choice"][model]["backend"] in SDPA_NAMES
    assert data["summary"]["sdpa_choice"]["cogvideox-5b"] == s["sdpa_choice"]["cogvideox-5b"]["backend"]

    att = s["attention"]
    assert list(att["backends"]) == BACKENDS
    for direction in ("forward", "forward_backward"):
        assert_timed(att["backends"]["flash"][direction], "tflops")  # SDPA's flash kernel runs on CPU
        for name in ("cudnn", "efficient"):
            assert att["backends"][name][direction]["status"] == "unavailable"
            assert "needs CUDA" in att["backends"][name][direction]["reason"]
        assert att["summary"][direction]["fastest"] == "flash"
    assert att["auto"] == {**att["auto"], "status": "ok", "backend": "sdpa"}
    assert att["summary"]["forward_backward"]["auto_is_fastest"] is None  # auto's `sdpa` is not one of those timed

    assert list(s["gemm"]["shapes"]) == SHAPES
    for shape in s["gemm"]["shapes"].values():
        assert_timed(shape["bf16"], "tflops")
        for recipe in ("rowwise", "tensorwise"):
            rec = shape[f"fp8_{recipe}"]
            assert rec["status"] in ("ok", "error"), rec  # whatever _scaled_mm does on CPU, recorded
            if rec["status"] == "ok":
                assert rec["tflops"] >= 0 and shape[f"fp8_{recipe}_speedup"] > 0
            else:
                assert rec["error"] and shape[f"fp8_{recipe}_speedup"] is None

    lora = s["lora_linear"]
    assert lora["kernel"]["status"] == "ok" and lora["kernel"]["config"].startswith("BLOCK ")
    assert list(lora["shapes"]) == SHAPES
    for shape in lora["shapes"].values():
        for direction in ("forward", "forward_backward"):
            assert_timed(shape[f"fused_{direction}"])
            assert_timed(shape[f"unfused_{direction}"])
            assert shape[f"fused_over_unfused_{direction}"] > 0
    assert_timed(s["copy"]["result"], "gb_per_s")
    assert s["copy"]["bytes"] > 0

    md = (tmp_path / "probe.md").read_text()
    assert md.count("CPU dry run: not a measurement") == 2  # at the top and the bottom
    positions = [md.index(f"## {sec['title']}") for sec in s.values()]
    assert positions == sorted(positions)
    assert "| flash (SDPA) |" in md and "| 48->96 |" in md
    assert md in capsys.readouterr().out  # printed as well


def test_failing_measurement_is_recorded_and_the_probe_goes_on(probe, tmp_path, monkeypatch):
    seen_on_disk = []

    def broken_bf16(*args, **kwargs):
        # While a measurement runs, probe.json already holds what came before it.
        seen_on_disk.append(json.loads((tmp_path / "probe.json").read_text()))
        raise RuntimeError("deliberate failure")

    def broken_ratios(shape):
        raise RuntimeError("deliberate fault")

    monkeypatch.setattr(probe.gemm, "bf16", broken_bf16)
    monkeypatch.setattr(probe.lora, "ratios", broken_ratios)  # a fault outside any one measurement
    # The fused kernel's interpreted runs are test_dry_run's; here they do not fit the budget.
    monkeypatch.setitem(probe.TINY_NEEDS_S, "lora_fused", 1e9)
    data = run(probe, tmp_path)

    assert data["complete"] is True
    on_disk = seen_on_disk[0]
    assert on_disk["complete"] is False
    assert on_disk["sections"]["attention"]["state"] == "done"
    assert on_disk["sections"]["gemm"]["state"] == "running"
    assert on_disk["sections"]["copy"]["state"] == "pending"

    gemm = data["sections"]["gemm"]["shapes"]
    for shape in gemm.values():
        assert shape["bf16"] == {**shape["bf16"], "status": "error", "error": "RuntimeError: deliberate failure"}
        assert shape["fp8_rowwise_speedup"] is None  # nothing to compare with
        assert shape["fp8_tensorwise"]["status"] in ("ok", "error")
        assert "deliberate" not in shape["fp8_tensorwise"].get("error", "")
    lora = data["sections"]["lora_linear"]
    assert lora["shapes"]["48->48"]["fused_forward"]["status"] == "skipped: budget"
    assert lora["shapes"]["48->48"]["unfused_forward"]["status"] == "ok"
    assert lora["state"] == "running" and list(lora["shapes"]) == ["48->48"]  # cut by the fault
    assert data["errors"] == [{"step": "probe_lora", "error": "RuntimeError: deliberate fault"}]
    assert data["sections"]["copy"]["result"]["status"] == "ok"
    md = (tmp_path / "probe.md").read_text()
    assert "error [1]" in md and "RuntimeError: deliberate failure" in md
    assert "in probe_lora: RuntimeError: deliberate fault" in md


def test_budget_skips_what_does_not_fit(probe, tmp_path):
    data = run(probe, tmp_path, "--budget-s", "0")
    assert data["complete"] is True
    found = records(data)
    assert found[0][0] == "environment/facts" and found[0][1]["status"] == "ok"  # always recorded
    later = found[1:]
    # sdpa_choice 2, auto 1, 5 backends x 2, 3 shapes x 3 GEMMs, kernel pin 1, 3 shapes x 4 LoRA, copy 1
    assert len(later) == 2 + 1 + 10 + 9 + 1 + 12 + 1 and later[-1][0] == "copy/result"
    for path, rec in later:
        assert rec["status"] == "skipped: budget", path
        assert rec["time_left_s"] <= 0 and "needs_s" in rec
    assert "skipped: budget" in (tmp_path / "probe.md").read_text()
    with pytest.raises(SystemExit):
        probe.parse(["--out", str(tmp_path), "--budget-s", "-1"])
