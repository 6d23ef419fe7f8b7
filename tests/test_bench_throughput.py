"""bench/throughput.py on CPU: the tiny benchmark runs end to end with a selective row and every
leave-one-out row, its JSON holds every field, parity follows from the recorded values, each path
records the attention op it ran, a reused reference gives the in-process results, a fast path made
to differ fails parity, a bad option is one line; the GPU recipes' row plans are checked unrun."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "throughput.py"
def json_file(out: Path) -> Path:
    (path,) = out.glob("throughput_*.json")
    return path


def only_json(out: Path) -> dict:
    return json.loads(json_file(out).read_text())


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("fastcog_bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# The switches of bench/throughput_lib/config.py's CPU_TINY_CONFIG.
CPU_SWITCHES = ["fast.lora_kernel=true", "fast.fused_loss=true", "fast.attention=sdpa",
                "train.activation_checkpointing=none", "optim.fused=true"]
CPU_SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"  # what SDPA runs on CPU for these fp32 inputs
RUN = ["--steps", "2", "--warmup", "1"]  # the module run's shape; the in-process runs that reuse it match it


STAGES = ("headline", "selective", "ablation")
"""The GPU suite's dry run runs the benchmark three times (tests/suite_dry_run.py): the reference and fastcog
paths (--rows fastcog), then the selective row and every leave-one-out row, each against the headline's
reference (--reference-from); all with RUN's steps and --ablation-steps 1."""


@pytest.fixture(scope="module")
def cpu_run(gpu_suite_dry_run) -> tuple[SimpleNamespace, Path, dict]:
    """(the three runs' stdout, the headline's folder, the headline's JSON with the later runs' rows appended
    and each run's own JSON under "runs")."""
    out = gpu_suite_dry_run.out
    runs = {stage: only_json(out / stage) for stage in STAGES}
    head = runs["headline"]
    merged = {**head, "paths": head["paths"] + [p for stage in STAGES[1:] for p in runs[stage]["paths"][1:]],
              "runs": runs}
    stdout = "".join((out / stage / "stage.log").read_text() for stage in STAGES)
    return SimpleNamespace(stdout=stdout), out / "headline", merged


@pytest.fixture
def in_process(bench_module, monkeypatch, capsys, request):
    """main() in this process as the module run runs it (eager stand-ins, one torch thread: the same reduction
    order); returns (exit status, stdout, stderr)."""
    import torch

    from tests.eager_kernels import use_eager_kernels

    use_eager_kernels(monkeypatch)
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))

    def run(out: Path, *args: str) -> tuple[int, str, str]:
        code = bench_module.main(["--tiny", "--device", "cpu", "--out-dir", str(out), "--no-plot", "--cpu-threads",
                                  "1", *args])
        return (code, *capsys.readouterr())

    return run


def by_name(report: dict) -> dict[str, dict]:
    return {p["name"]: p for p in report["paths"]}


def test_the_table_and_the_json_hold_every_field(cpu_run):
    done, out, r = cpu_run
    assert "CPU run: not a performance claim" in done.stdout and "| reference |" in done.stdout
    assert "| path | switches on | status | attention kernel | p50 s | p10 s | p90 s |" in done.stdout
    assert f"| fastcog | {', '.join(CPU_SWITCHES)} | ok | {CPU_SDPA} |" in done.stdout
    assert r["cpu_run"] is True and "not a performance claim" in r["note"] and r["complete"] is True
    assert r["date"] and r["hardware"]["device"] == "cpu" and r["hardware"]["name"]
    assert r["hardware"]["torch_threads"] == 1  # --cpu-threads' default
    assert all(r["versions"][pkg] for pkg in ("torch", "triton", "diffusers", "peft")) and {"commit", "dirty"} <= set(
        r["git"])
    s = r["setup"]
    assert (s["variant"], s["tiny"], s["frames"], s["height"], s["width"]) == ("cogvideox-5b", True, 9, 64, 96)
    assert s["batch_size"] == 1 and s["lora_rank"] == 8 and s["video_tokens_per_sample"] == 3 * 4 * 6
    assert s["model_flops_per_sample"] > 0 and s["transformer_config"]["num_layers"] == 2
    ref, fast = r["paths"][0], r["paths"][1]
    assert all(set(p["config"]) >= {"model", "lora", "optim", "train", "fast"} for p in r["paths"])
    assert [p["role"] for p in r["paths"]] == ["reference", "fastcog", "selective"] + ["leave-one-out"] * 5
    assert r["headline"] == "fastcog" and s["rows"] == ["fastcog"] and s["reference_from"] is None
    for stage, rows in (("selective", ["selective"]), ("ablation", ["leave-one-out"])):
        later = r["runs"][stage]["setup"]
        assert later["rows"] == rows and later["reference_from"] == str(json_file(out)), stage
    assert s["total_steps"] == 3
    tol = r["parity_tolerance"]  # which tolerances no measurement calibrated
    assert tol["provisional"] == {"fp32": False, "bf16": True, "fp16": True, "fp8": True}
    assert tol["basis"]["fp8"] == "rounding analysis, not calibrated on a GPU run"
    assert fast["parity"]["rtol_kind"] == "fp32" and fast["parity"]["rtol_provisional"] is False
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
        par = p["parity"]
        rtol = par["rtol"]
        assert rtol == r["parity_tolerance"]["rtol_by_dtype"]["fp32"] == 1e-4 and p["status"] == "ok"
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


def changed(a: dict, b: dict) -> set[str]:
    """section.key of every value that differs between two recorded configs."""
    return {f"{sec}.{key}" for sec in a for key in a[sec] if a[sec][key] != b[sec][key]}


def test_leave_one_out_and_selective_rows(cpu_run):
    """Each leave-one-out row sets one fastcog switch back to the reference's value, together all of them;
    the selective row is the fastcog path with selective checkpointing. Same seed, batch and starting weights
    at step k: a row whose switch leaves the arithmetic alone gives the fastcog path's values exactly (the
    checkpointing policies: recomputation repeats the same ops; the unfused optimizer at step 1, before it
    acts); every row matches the reference at step 1 within rtol."""
    _, _, r = cpu_run
    ref, fast = r["paths"][0], r["paths"][1]
    assert sorted(fast["switches"]) == sorted(CPU_SWITCHES)
    covered = set()
    for p in (p for p in r["paths"] if p["role"] == "leave-one-out"):
        (field,) = changed(fast["config"], p["config"])
        section, key = field.split(".")
        assert p["config"][section][key] == ref["config"][section][key], p["name"]
        assert p["name"] == f"fastcog - {field}" and p["status"] == "ok"
        assert p["switches"] == [s for s in fast["switches"] if not s.startswith(f"{field}=")]
        covered.add(field)
    assert covered == {s.split("=")[0] for s in CPU_SWITCHES}
    row = by_name(r)["fastcog, selective checkpointing"]
    assert (row["role"], row["status"], row["patches"]["activation_checkpointing"]) == ("selective", "ok", "selective")
    assert changed(fast["config"], row["config"]) == {"train.activation_checkpointing"}
    rows = by_name(r)
    # One warm-up step, then --ablation-steps 1 (a leave-one-out row) or --steps 2 (the selective row's own run).
    for name, steps in (("fastcog - train.activation_checkpointing", 2), ("fastcog, selective checkpointing", 3)):
        p = rows[name]
        assert len(p["losses"]) == steps, name
        assert (p["losses"], p["grad_norms"]) == (fast["losses"][:steps], fast["grad_norms"][:steps]), name
    unfused = rows["fastcog - optim.fused"]
    assert (unfused["losses"][0], unfused["grad_norms"][0]) == (fast["losses"][0], fast["grad_norms"][0])
    rtol = r["parity_tolerance"]["rtol_by_dtype"]["fp32"]
    for p in r["paths"][1:]:
        assert p["losses"][0] == pytest.approx(ref["losses"][0], rel=rtol), p["name"]
        assert p["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=rtol), p["name"]


def test_each_path_records_the_attention_op_it_ran(bench_module, cpu_run):
    """The reference (diffusers' processor, SDPA's choice) and fastcog's sdpa backend both run SDPA's CPU
    flash kernel on these fp32 inputs, forward and backward; the math backend is told apart."""
    import torch
    import torch.nn.functional as F
    from throughput_lib.attention_probe import attention_kernels, attention_profiler, is_attention_kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for p in cpu_run[2]["paths"]:
        assert p["attention_kernel"] == CPU_SDPA, p["name"]
        assert p["attention_kernels"] == ["aten::scaled_dot_product_attention", CPU_SDPA, f"{CPU_SDPA}_backward"]
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with attention_profiler(torch.device("cpu")) as prof, sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert attention_kernels(prof)[1] == "aten::_scaled_dot_product_attention_math"
    kernels = ("void pytorch_flash::flash_fwd_kernel<...>", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
               "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "sm90_xmma_fprop_implicit_gemm_cudnn")
    assert [is_attention_kernel(k) for k in kernels] == [True, True, True, False]


def test_starting_adapters_and_a_run_without_warmup(bench_module):
    """Whichever path a process builds first, in whatever storage dtype, the adapters start bit-identical (what
    a reference reused from another process needs). With no warm-up step no attention kernel is recorded."""
    import torch
    from throughput_lib.config import prepare
    from throughput_lib.models import setup_bench
    from throughput_lib.paths import build_path, lora_state, run_path

    args = bench_module.parse_args("--tiny --device cpu --steps 1 --warmup 0".split())
    device, cfg, fast_cfg, variant, _, tiny = prepare(args)
    ref, fast = bench_module.plan_paths(cfg, fast_cfg, args, 1)
    fast = dataclasses.replace(fast, frozen_dtype="bf16")  # peft draws A in the storage dtype; bf16 on CPU is slow
    bench = setup_bench(args, cfg, variant, tiny, device, 1, 0)
    res = run_path(ref, bench)  # the first path built: it draws the adapters
    assert res.ok and (res.attention_kernels, res.attention_kernel) == ([], "not recorded: no warm-up step")
    first, bench.init_lora = bench.init_lora, None  # as in a process whose first path is the fastcog one
    second = lora_state(build_path(fast, bench)[0])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(first[k].abs().max() > 0 for k in first)  # A and (--lora-b-init random) B drawn, not left at zero


def test_a_reused_reference_gives_the_in_process_results(cpu_run, in_process, tmp_path, monkeypatch):
    """--reference-from the module run's JSON: the reference row is copied as it was, the fastcog path's losses
    and gradient norms are bit-identical to those of the run that ran its reference itself, parity and speedup
    are computed against the reused row, and the JSON is rewritten after each path."""
    import throughput_lib.runner as runner

    _, run_out, earlier = cpu_run
    writes, write = [], runner.write_json
    monkeypatch.setattr(runner, "write_json", lambda path, report: (
        writes.append((report["complete"], [p["name"] for p in report["paths"]])), write(path, report)))
    code, out, err = in_process(tmp_path, *RUN, "--reference-from", str(json_file(run_out)))
    assert code == 0, out[-3000:] + err[-3000:]
    assert writes == [(False, ["reference"]), (False, ["reference", "fastcog"]), (True, ["reference", "fastcog"])]
    r, reused = only_json(tmp_path), str(json_file(run_out))
    assert r["paths"][0] == {**earlier["paths"][0], "reused_from": reused} and r["setup"]["reference_from"] == reused
    fast, before = r["paths"][1], earlier["paths"][1]
    assert [fast[k] for k in ("losses", "grad_norms", "lrs")] == [before[k] for k in ("losses", "grad_norms", "lrs")]
    assert "reference (reused)" in out
    par = fast["parity"]
    assert [row["reference"] for row in par["loss"]["per_step"]] == earlier["paths"][0]["losses"]
    assert r["parity"] == par and par["verdict"] == "PASS" and r["headline"] == "fastcog"
    assert par["final_lora_weights"]["rel_to_update"] is None and "another process" in par["final_lora_weights"]["note"]
    ref_p50 = earlier["paths"][0]["metrics"]["step_time_s"]["p50"]
    assert r["speedup"] == pytest.approx(ref_p50 / fast["metrics"]["step_time_s"]["p50"])


def test_a_reference_from_another_setup_is_one_line(cpu_run, in_process, tmp_path):
    for argv, message in ((["--rank", "4"], "setup.lora_rank is 8 there, 4 here"),
                          (["--warmup", "0"], "setup.warmup_steps is 1 there, 0 here"),
                          (["--set", "optim.lr=0.5"], "the reference's optim.lr is"),
                          (["--steps", "3"], "its reference recorded 3 steps, the longest row here needs 4")):
        code, _, err = in_process(tmp_path, *RUN, "--reference-from", str(json_file(cpu_run[1])), *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_a_row_that_differs_fails_parity(cpu_run, in_process, tmp_path):
    """Doubling LoRA alpha on the fastcog side must be caught (the check can fail). With the reference reused
    and no fastcog row, the selective row is the headline: its parity decides the exit status, and
    --max-seconds skips the rows after it, not it. The rows run on the reused reference's LR schedule length."""
    earlier = str(json_file(cpu_run[1]))
    code, out, err = in_process(tmp_path, "--steps", "1", "--warmup", "1", "--reference-from", earlier, "--rows",
                                "selective,-optim.fused", "--fast-only-set", "lora.alpha=16", "--max-seconds", "0")
    assert code == 3, out[-3000:] + err[-3000:]
    assert "**Parity: FAIL**" in out and "not a like-for-like comparison" in out
    assert "the fastcog, selective checkpointing path FAILED parity" in err
    r = only_json(tmp_path)
    assert (r["headline"], r["setup"]["fast_only_overrides"]) == ("fastcog, selective checkpointing", ["lora.alpha=16"])
    assert r["parity"] == r["paths"][1]["parity"] and r["parity"]["verdict"] == "FAIL"
    assert r["parity"]["grad_norm"]["max_rel_diff"] > 0.5  # the adapters' gradients scale with alpha / r
    assert r["paths"][2]["status"] == "skipped: --max-seconds 0 reached"
    assert r["setup"]["total_steps"] == cpu_run[2]["setup"]["total_steps"] == 3


def test_bad_options_are_one_line(bench_module, capsys, tmp_path):
    parse = bench_module.parse_args
    assert (parse([]).rows, parse(["--ablation"]).rows) == (("fastcog",), ("fastcog", "leave-one-out"))
    assert parse(["--rows", "selective, -fast.fp8,+frozen_storage"]).rows == ("selective", "-fast.fp8",
                                                                              "+frozen_storage")
    unknown = ("unknown row '-fast.fp9': give fastcog, selective, leave-one-out, add-one, -KEY or +KEY with KEY one "
               "of frozen_storage, fast.lora_kernel")
    for argv, message in ((["--rows", "fastcog,-fast.fp9"], unknown),
                          (["--rows", "-fast.fp8"], "the fastcog path does not turn fast.fp8 on; its switches: "
                                                    "fast.lora_kernel"),  # no FP8 on CPU
                          (["--ablation", "--rows", "fastcog"], "--ablation is --rows fastcog,leave-one-out"),
                          (["--frames", "10"], "data.num_frames=10 is not 8N+1")):
        code = bench_module.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def changed_fields(a, b) -> set[str]:
    from fastcog.config import to_dict

    return changed(to_dict(a), to_dict(b))


@pytest.mark.parametrize("recipe", ["t2v_h100.yaml", "t2v_2b_h100.yaml", "i2v_h100.yaml", "t2v_1.5_h100.yaml"])
def test_row_plan_from_a_gpu_recipe(bench_module, recipe):
    """The reference has every fast switch off; each leave-one-out row (--ablation) sets exactly one of the
    recipe's back and together they cover everything the fastcog path changes; each add-one row turns exactly
    one on; rows run in the order given, a row named twice once, --ablation-steps for all but the main paths;
    the headline row is fastcog, else selective, else none."""
    from throughput_lib.rows import headline

    from fastcog.config import FastConfig, load_config

    cfg = load_config(ROOT / "configs" / recipe)
    paths = bench_module.plan_paths(cfg, cfg, bench_module.parse_args(["--ablation"]), steps=2)
    ref, fast, rows = paths[0], paths[1], paths[2:]
    assert [p.role for p in paths] == ["reference", "fastcog"] + ["leave-one-out"] * len(rows)
    assert (ref.frozen_dtype, fast.frozen_dtype) == ("fp32", cfg.model.dtype)
    assert (ref.cfg.train.activation_checkpointing, ref.cfg.optim.name, ref.cfg.optim.fused) == ("full", "adamw", False)
    for name in ("lora_kernel", "fused_loss", "attention", "compile", "fp8", "fp8_weight_storage"):
        assert getattr(ref.cfg.fast, name) == getattr(FastConfig(), name)
    covered = set()
    for row in rows:
        diff = changed_fields(fast.cfg, row.cfg)
        (field,) = diff or {"frozen_storage"}  # the storage row: the fastcog config, frozen weights in fp32
        assert row.name == f"fastcog - {field}" and row.frozen_dtype == ("fp32" if not diff else fast.frozen_dtype)
        if diff:
            section, key = field.split(".")
            assert getattr(getattr(row.cfg, section), key) == getattr(getattr(ref.cfg, section), key)
        covered.add(field)
        assert set(row.switches) < set(fast.switches) and len(row.switches) == len(fast.switches) - 1
    assert covered == changed_fields(ref.cfg, fast.cfg) | {"frozen_storage"}
    assert headline(paths) is fast and headline(paths[:1] + rows) is None

    args = bench_module.parse_args(["--rows", "selective,add-one,+fast.fp8,-fast.compile", "--ablation-steps", "1"])
    paths = bench_module.plan_paths(cfg, cfg, args, steps=2)
    adds, selective = paths[2:-1], paths[1]
    assert [p.role for p in paths] == ["reference", "selective"] + ["add-one"] * len(fast.switches) + ["leave-one-out"]
    assert [p.steps for p in paths] == [2] + [1] * (len(paths) - 1) and paths[-1].name == "fastcog - fast.compile"
    assert changed_fields(fast.cfg, selective.cfg) == {"train.activation_checkpointing"}
    assert selective.name == "fastcog, selective checkpointing" and headline(paths) is selective
    for row in adds:
        diff, (label,) = changed_fields(ref.cfg, row.cfg), row.switches
        assert row.name == f"reference + {label}"
        if diff:
            assert row.frozen_dtype == "fp32" and len(diff) == 1 and label.startswith(f"{diff.pop()}=")
        else:  # the storage row: the reference config, frozen weights in the compute dtype
            assert row.frozen_dtype == cfg.model.dtype != "fp32"
    assert fast.switches == tuple(row.switches[0] for row in adds)


def test_rows_that_would_be_invalid_bring_what_they_need(bench_module):
    """Selective checkpointing keeps fastcog's attention outputs: leaving out fastcog's attention also leaves
    out selective checkpointing, adding selective to the reference adds fastcog's attention, and a selective
    row for a fastcog path on diffusers' attention switches fastcog's on; each name says so."""
    from throughput_lib.config import prepare

    from fastcog.config import validate

    def plan(*argv: str):
        args = bench_module.parse_args(["--tiny", "--device", "cpu", *argv])
        _, cfg, fast_cfg, *_ = prepare(args)
        return fast_cfg, bench_module.plan_paths(cfg, fast_cfg, args, 1)[1:]

    fast_cfg, (drop, add) = plan("--set", "train.activation_checkpointing=selective", "--rows",
                                 "-fast.attention,+train.activation_checkpointing")
    assert drop.name == ("fastcog - fast.attention (and train.activation_checkpointing=full: selective keeps "
                         "fastcog's attention outputs)")
    assert changed_fields(fast_cfg, drop.cfg) == {"fast.attention", "train.activation_checkpointing"}
    assert add.name == "reference + train.activation_checkpointing=selective + fast.attention=sdpa"
    selective_cfg, (selective,) = plan("--set", "fast.attention=reference", "--rows", "selective")
    assert changed_fields(selective_cfg, selective.cfg) == {"fast.attention", "train.activation_checkpointing"}
    assert selective.name.startswith("fastcog, selective checkpointing + fast.attention=auto")
    for row in (drop, add, selective):
        validate(row.cfg)


def test_provisional_tolerances_are_marked(bench_module, cpu_run):
    """FP8 and bf16 tolerances come from rounding analysis: the parity entry says so and the table marks it."""
    import copy

    from throughput_lib.markdown import render_markdown
    from throughput_lib.metrics import parity, parity_rtol
    from throughput_lib.paths import PathResult

    from fastcog.config import load_config

    cfg = load_config(ROOT / "configs" / "t2v_h100.yaml")
    ref, fast = bench_module.plan_paths(cfg, cfg, bench_module.parse_args([]), steps=1)
    fp8, bf16 = (PathResult(fast, status="ok", losses=[1.01], grad_norms=[1.0], patch_report={"fp8_linears": names})
                 for names in (["a"], []))
    assert parity_rtol(fp8, None) == (3e-2, "fp8") and parity_rtol(bf16, None) == (1e-2, "bf16")
    par = parity(PathResult(ref, status="ok", losses=[1.0], grad_norms=[1.0]), fp8, *parity_rtol(fp8, None))
    assert par["rtol_provisional"] is True and par["verdict"] == "PASS"
    report = copy.deepcopy(cpu_run[2])
    report["parity"] = report["paths"][1]["parity"] = par
    text = render_markdown(report)
    assert "every step within rtol 3e-02 (provisional)" in text and "PASS (1.00e-02; 3e-02 (provisional)) |" in text
    assert render_markdown(cpu_run[2]).count("(provisional)") == 1  # fp32: only the legend
    text = render_markdown({**cpu_run[2], "headline": None, "parity": None, "speedup": None})  # leave-one-out only
    assert "**No headline row**" in text and "Speedup" not in text


def test_every_recipe_the_benchmark_names_exists(bench_module):
    for name in bench_module.RECIPES.values():
        assert (ROOT / "configs" / name).is_file(), name
