"""fastcog.build: one function builds the training model, for the trainer and the benchmark alike."""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import torch

from fastcog.build import build_training_model, module_summary

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
# Every switch that changes the module tree or wraps a forward (compile stays lazy: no compile
# happens until a forward, which this test never runs).
SWITCHES = ["model.dtype=bf16", "fast.fp8=tensorwise", "fast.fp8_min_features=16", "fast.lora_kernel=true",
            "fast.attention=sdpa", "fast.compile=true", "train.activation_checkpointing=selective"]


def bench_fastcog_model() -> tuple[torch.nn.Module, object]:
    """The benchmark's fastcog path, built as `bench/throughput.py --tiny` builds it."""
    bench_main = runpy.run_path(str(BENCH), run_name="fastcog_bench_build")  # puts throughput_lib on sys.path
    from throughput_lib.config import prepare
    from throughput_lib.models import setup_bench
    from throughput_lib.paths import build_path, plan_paths

    argv = ["--tiny", "--device", "cpu", "--no-plot", "--steps", "1", "--warmup", "0"]
    args = bench_main["parse_args"]([*argv, *[a for s in SWITCHES for a in ("--set", s)]])
    device, cfg, fast_cfg, variant, _, tiny = prepare(args)
    paths = plan_paths(cfg, fast_cfg, args, 1)
    bench = setup_bench(args, cfg, variant, tiny, device, 1, 0)
    spec = next(p for p in paths if p.role == "fastcog")
    model, *_ = build_path(spec, bench)
    return model, spec.cfg


def test_trainer_and_benchmark_build_the_same_model(tiny_checkpoint):
    bench_model, cfg = bench_fastcog_model()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tiny_checkpoint("cogvideox-5b"))))
    trainer_model = build_training_model(cfg, torch.device("cpu"), tokens_per_sample=72, verbose=False).par.module
    ours, theirs = module_summary(trainer_model), module_summary(bench_model)
    assert ours == theirs
    text = "\n".join(ours)
    # The summary sees every switch, so a step one builder skipped would show.
    for mark in ("Fp8Linear", "FastCogVideoXAttnProcessor", "checkpoint=selective", "compiled", "patched_forward"):
        assert mark in text, mark
