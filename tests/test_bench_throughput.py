"""bench/throughput.py on CPU: the tiny benchmark runs end to end, its JSON holds every field the
issue asks for, its parity verdict follows from the recorded per-step values, a fast path made to
differ is reported as a parity FAIL, and a bad option is one line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "throughput.py"
# One BLAS thread: the Triton interpreter's numpy matmuls are tiny, and CI machines are shared.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# The benchmark with tests/eager_kernels.py's stand-ins under fastcog's custom ops: the subject here is
# the benchmark (paths, table, JSON, parity verdict), and the interpreted kernels, the parity suite's
# subject, took 10 of its 17 s (measured, --steps 2).
EAGER_KERNELS = ("import runpy, sys, pytest; from tests.eager_kernels import use_eager_kernels; "
                 "use_eager_kernels(pytest.MonkeyPatch()); sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_bench(out: Path, *args: str, eager_kernels: bool = False) -> subprocess.CompletedProcess:
    driver = ["-c", EAGER_KERNELS] if eager_kernels else []
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), ENV.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *driver, str(BENCH), "--tiny", "--device", "cpu", "--out-dir", str(out), *args],
        cwd=out, env=env, capture_output=True, text=True, timeout=600,
    )


def only_json(out: Path) -> dict:
    files = sorted(out.glob("throughput_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("fastcog_bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    done = run_bench(out, "--steps", "2", "--warmup", "1", "--ablation", "--ablation-steps", "1", eager_kernels=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, out, only_json(out)


def test_cpu_run_prints_the_table_and_says_it_is_no_claim(cpu_run):
    done, _, report = cpu_run
    assert "CPU run: not a performance claim" in done.stdout
    assert "| path | switches on | status | p50 s | p10 s | p90 s |" in done.stdout
    assert "| reference |" in done.stdout and "| fastcog |" in done.stdout
    assert report["cpu_run"] is True and "not a performance claim" in report["note"]
    assert report["complete"] is True


def test_json_holds_every_field(cpu_run):
    _, out, r = cpu_run
    assert r["date"] and r["hardware"]["device"] == "cpu" and r["hardware"]["name"]
    assert r["hardware"]["torch_threads"] == 1  # --cpu-threads' default
    for pkg in ("torch", "triton", "diffusers", "peft"):
        assert r["versions"][pkg], pkg
    assert {"commit", "dirty"} <= set(r["git"])
    s = r["setup"]
    assert (s["variant"], s["tiny"], s["frames"], s["height"], s["width"]) == ("cogvideox-5b", True, 9, 64, 96)
    assert s["batch_size"] == 1 and s["lora_rank"] == 8 and s["video_tokens_per_sample"] == 3 * 4 * 6
    assert s["model_flops_per_sample"] > 0 and s["transformer_config"]["num_layers"] == 2

    by_role = {}
    for p in r["paths"]:
        by_role.setdefault(p["role"], []).append(p)
        assert set(p["config"]) >= {"model", "lora", "optim", "train", "fast"}
    ref, fast = by_role["reference"][0], by_role["fastcog"][0]
    assert len(by_role["ablation"]) >= 1
    for p in (ref, fast):
        m = p["metrics"]
        st = m["step_time_s"]
        assert 0 < st["p10"] <= st["p50"] <= st["p90"] and len(st["all"]) == 2
        assert len(m["warmup_step_times_s"]) == 1 and m["compile_warmup_s"] >= 0
        assert m["samples_per_s"] == pytest.approx(1 / st["p50"])
        assert m["video_tokens_per_s"] == pytest.approx(s["video_tokens_per_sample"] / st["p50"])
        assert m["model_tflops_per_s"] == pytest.approx(s["model_flops_per_sample"] / st["p50"] / 1e12)
        assert m["mfu"] is None  # no peak for a CPU
        assert m["peak_memory_allocated_gb"] is None and m["peak_memory_reserved_gb"] is None
        assert m["memory_note"] == "not measured on CPU"
        assert len(p["losses"]) == len(p["grad_norms"]) == 3  # one warm-up step and --steps 2
        assert all(math.isfinite(x) for x in p["losses"])
    # The plan's estimate beside the measured peak, for the fastcog paths (the reference's fp32 frozen
    # weights are not what the plan models); nothing to compare with on CPU.
    assert ref["metrics"]["planned_peak_gb"] is None
    assert fast["metrics"]["planned_peak_gb"] > 0 and fast["metrics"]["planned_over_measured"] is None
    # The plan's step time is a GPU datasheet bound: none on CPU, for every path, with the reason.
    for p in r["paths"]:
        m = p["metrics"]
        assert m["planned_step_time_s"] is None and m["planned_step_time_over_measured"] is None, p["name"]
        assert m["planned_step_time_note"].startswith("CPU run:"), p["name"]
    assert ref["config"]["fast"]["lora_kernel"] is False and ref["frozen_weights_dtype"] == "fp32"
    assert fast["switches"] and fast["status"] == "ok"
    assert r["speedup"] == pytest.approx(ref["metrics"]["step_time_s"]["p50"] / fast["metrics"]["step_time_s"]["p50"])
    assert r["targets"]["applicable"] is False and r["targets"]["not_applicable_because"] == "CPU run"
    png = Path(r["plot"])
    assert png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plan_gives_a_step_time_on_a_known_gpu(bench_module, cpu_run):
    """The GPU side of the plan on this machine: the fastcog path's recorded config and architecture, planned
    for an H100, give the plan's predicted step time (the same plan's peak is the one the CPU run recorded)."""
    from throughput_lib.planned import path_plan, step_time_estimate

    from fastcog.config import config_from_dict
    from fastcog.gpus import gpu_by_key

    _, _, r = cpu_run
    fast = r["paths"][1]
    gpu = gpu_by_key("h100-80gb")
    plan = path_plan(config_from_dict(fast["config"]), r["setup"]["transformer_config"],
                     fast["patches"]["activation_checkpointing"], gpu)
    seconds, note = step_time_estimate(plan, gpu)
    assert plan.tokens_per_sample == r["setup"]["video_tokens_per_sample"]  # the bench's shape, not a bucket
    assert seconds == plan.step_time_s > plan.step_time_lower_bound_s > 0  # attention below the peak
    assert plan.step_time_lower_bound_s == pytest.approx(plan.executed_flops_per_step / gpu.bf16_flops)  # no FP8
    assert "h100-80gb" in note and "predicted" in note and plan.attention.backend in note
    assert plan.memory.peak(plan.policy) / 1e9 == pytest.approx(fast["metrics"]["planned_peak_gb"])


def test_parity_verdict_follows_from_the_recorded_values(cpu_run):
    _, _, r = cpu_run
    ref = r["paths"][0]
    for p in r["paths"][1:]:
        if p["status"] != "ok":
            continue
        par = p["parity"]
        rtol = par["rtol"]
        assert rtol == r["parity_tolerance"]["rtol_by_dtype"]["fp32"] == 1e-4
        ok = True
        for key, series in (("losses", "loss"), ("grad_norms", "grad_norm")):
            rows = par[series]["per_step"]
            assert len(rows) == len(p[key])
            for row, a, b in zip(rows, ref[key], p[key]):
                assert (row["reference"], row["path"]) == (a, b)
                assert row["rel_diff"] == pytest.approx(abs(b - a) / abs(a))
                assert row["pass"] == (abs(b - a) / abs(a) <= rtol)
                ok = ok and row["pass"]
        assert par["verdict"] == ("PASS" if ok else "FAIL")
        assert par["first_step_identical_weights"]["loss"] == par["loss"]["per_step"][0]
    assert r["parity"] == r["paths"][1]["parity"] and r["parity"]["verdict"] == "PASS"


# The switches of bench/throughput_lib/config.py's CPU_TINY_CONFIG, each an ablation row.
CPU_SWITCHES = ["fast.lora_kernel=true", "fast.fused_loss=true", "fast.attention=sdpa",
                "train.activation_checkpointing=none", "optim.fused=true"]


def test_each_ablation_row_turns_on_one_fastcog_switch(cpu_run):
    _, _, r = cpu_run
    ref, fast = r["paths"][0], r["paths"][1]
    rows = [p for p in r["paths"] if p["role"] == "ablation"]
    assert sorted(p["switches"][0] for p in rows) == sorted(fast["switches"]) == sorted(CPU_SWITCHES)
    for p in rows:
        assert len(p["switches"]) == 1
        assert p["status"] == "ok" or p["status"].startswith("failed: ")
        changed = {(sec, key) for sec in ref["config"] for key in ref["config"][sec]
                   if ref["config"][sec][key] != p["config"][sec][key]}
        assert len(changed) == 1, (p["name"], changed)
        (section, key), = changed
        assert p["switches"][0].startswith(f"{section}.{key}=")


def test_every_path_starts_from_the_same_weights_and_draws(cpu_run):
    """Every path runs step k from the same seed, batch and starting weights, so a switch that does not
    change the arithmetic gives the reference's values exactly: without activation checkpointing every
    recorded step (recomputation repeats the same ops), with the fused optimizer the first step (taken
    before the optimizer has acted). The other rows agree at the first step within the parity tolerance."""
    _, _, r = cpu_run
    ref = r["paths"][0]
    rows = {p["switches"][0]: p for p in r["paths"] if p["role"] == "ablation"}
    assert all(p["status"] == "ok" for p in rows.values()), {k: p["status"] for k, p in rows.items()}
    no_ckpt = rows["train.activation_checkpointing=none"]
    steps = len(no_ckpt["losses"])
    assert steps == 2  # one warm-up step and --ablation-steps 1, each recorded
    assert (no_ckpt["losses"], no_ckpt["grad_norms"]) == (ref["losses"][:steps], ref["grad_norms"][:steps])
    fused = rows["optim.fused=true"]
    assert (fused["losses"][0], fused["grad_norms"][0]) == (ref["losses"][0], ref["grad_norms"][0])
    rtol = r["parity_tolerance"]["rtol_by_dtype"]["fp32"]
    for p in [*rows.values(), r["paths"][1]]:
        assert p["losses"][0] == pytest.approx(ref["losses"][0], rel=rtol), p["name"]
        assert p["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=rtol), p["name"]


def test_a_fast_path_that_differs_fails_parity(bench_module, tmp_path, capsys):
    """Doubling the fast path's LoRA alpha must be caught (the check can fail). Run in this process by the
    script's main (its return value is the exit status), keeping this process's torch thread count."""
    import torch

    code = bench_module.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path), "--steps", "1", "--warmup",
                              "1", "--no-plot", "--cpu-threads", str(torch.get_num_threads()), "--set",
                              "fast.lora_kernel=false", "--fast-only-set", "lora.alpha=16"])
    stdout = capsys.readouterr().out
    assert code == 3, stdout[-3000:]
    assert "**Parity: FAIL**" in stdout and "not a like-for-like comparison" in stdout
    r = only_json(tmp_path)
    assert r["setup"]["fast_only_overrides"] == ["lora.alpha=16"]
    assert r["parity"]["verdict"] == "FAIL"
    assert r["parity"]["grad_norm"]["max_rel_diff"] > 0.5  # the adapters' gradients scale with alpha / r


def test_bad_option_is_one_line(tmp_path):
    done = run_bench(tmp_path, "--frames", "10")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and "data.num_frames=10 is not 8N+1" in errors[0]
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("throughput_*"))


def changed_fields(a, b) -> set[str]:
    """section.key of every config value that differs between two Configs."""
    from fastcog.config import to_dict

    da, db = to_dict(a), to_dict(b)
    return {f"{sec}.{key}" for sec in da for key in da[sec] if da[sec][key] != db[sec][key]}


@pytest.mark.parametrize("recipe", ["t2v_h100.yaml", "t2v_2b_h100.yaml", "i2v_h100.yaml", "t2v_1.5_h100.yaml"])
def test_ablation_plan_from_a_gpu_recipe(bench_module, recipe):
    """The reference has every fast switch off; each ablation row adds exactly one of the recipe's, and
    together the rows cover everything the fastcog path changes."""
    from fastcog.config import FastConfig, load_config

    args = bench_module.parse_args(["--ablation"])
    cfg = load_config(ROOT / "configs" / recipe)
    paths = bench_module.plan_paths(cfg, cfg, args, steps=2)
    ref, fast, rows = paths[0], paths[1], paths[2:]
    assert (ref.role, fast.role) == ("reference", "fastcog") and all(p.role == "ablation" for p in rows)
    assert ref.frozen_dtype == "fp32" and fast.frozen_dtype == cfg.model.dtype
    assert ref.cfg.train.activation_checkpointing == "full"
    assert (ref.cfg.optim.name, ref.cfg.optim.fused) == ("adamw", False)
    defaults = FastConfig()
    for name in ("lora_kernel", "fused_loss", "attention", "compile", "fp8", "fp8_weight_storage"):
        assert getattr(ref.cfg.fast, name) == getattr(defaults, name)
    covered = set()
    for row in rows:
        assert len(row.switches) == 1
        changed = changed_fields(ref.cfg, row.cfg)
        if not changed:  # the storage row: same config, frozen weights in the compute dtype
            assert row.frozen_dtype == cfg.model.dtype != "fp32"
        else:
            assert row.frozen_dtype == "fp32" and len(changed) == 1, (row.switches, changed)
            assert row.switches[0].startswith(next(iter(changed)) + "=")
        covered |= changed
    assert covered == changed_fields(ref.cfg, fast.cfg)
    assert fast.switches == tuple(row.switches[0] for row in rows)


def test_every_recipe_the_benchmark_names_exists(bench_module):
    for name in bench_module.RECIPES.values():
        assert (ROOT / "configs" / name).is_file(), name
