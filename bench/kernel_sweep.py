"""Block-size sweep of the fused LoRA GEMM (fastcog.kernels.lora_linear) on the GPU at hand.

``lora_linear`` runs every product of its forward and backward through one Triton kernel,
``_fused_mm_kernel``, autotuned over a short config list (``_CONFIGS`` in
kernels/lora_linear.py). This script chooses that list by measurement:

1. For each CogVideoX linear shape (M = 17,776 tokens, rank 128, bf16) it runs one forward +
   backward with a wide candidate list as the autotune set. Triton's autotuner then times
   every candidate on every distinct launch (do_bench, p50) and the script records those
   timings from the autotuner.
2. It picks the fewest configs that keep every launch within ``--tolerance`` (default 3%) of
   its own best (greedy set cover): the recommended ``_CONFIGS``.
3. It times the whole forward + backward with each forced split-K value for the weight-
   gradient GEMMs (dA, dB, which reduce over 17,776 tokens into few output tiles), against
   the heuristic ``pick_split_k``.

Writes ``kernel_sweep.csv`` (one row per launch x config) and ``kernel_sweep.md`` (hardware,
versions, date, the per-launch best, the recommendation, the split-K table) to ``--out``.

``--smoke``: tiny shapes and two configs on CPU through the Triton interpreter with a
wall-clock timer, to check that the script runs. Its numbers are NOT performance claims.

    python bench/kernel_sweep.py                  # GPU
    python bench/kernel_sweep.py --smoke --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOKE_NOTE = (
    "SMOKE RUN on CPU through the Triton interpreter with a wall-clock timer: NOT performance "
    "claims; it only shows that the sweep runs."
)

# Candidates: the usual Hopper / Ampere GEMM tiles around 128 x 128 x 64, each compiled for
# sm_90 by bench/kernel_compile.py without spills (see bench/results/kernel_compile_*).
CANDIDATES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
    (64, 256, 64, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 64, 4, 5),
    (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
]  # fmt: skip
SMOKE_CANDIDATES = [(32, 32, 32, 4, 1), (16, 32, 16, 4, 1)]
SPLITS = [1, 2, 4, 8, 16]


@dataclass
class Timing:
    shape: str  # the case, e.g. "3072->3072"
    launch: str  # M x N x K (+K2), split-K and whether the second (LoRA) product is fused
    config: str  # BLOCK_MxBLOCK_NxBLOCK_K:warps:stages
    p50_ms: float
    tflops: float


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tokens", type=int, default=17_776)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--tolerance", type=float, default=0.03, help="a config covers a launch within this of its best")
    return p.parse_args(argv)


def label(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}:{cfg.num_warps}:{cfg.num_stages}"


def wall_clock_bench(fn: Callable[[], object], quantiles=(0.5, 0.2, 0.8), reps: int = 1) -> list[float]:
    """A CPU stand-in for triton.testing.do_bench (smoke mode only): one warm-up call and `reps` timed
    ones. The smoke checks the sweep's machinery; interpreter timings mean nothing, so one is enough."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


def cover(timings: dict[str, dict[str, float]], tolerance: float) -> list[str]:
    """Fewest configs such that every launch has one within ``tolerance`` of its best (greedy)."""
    good = {
        launch: {c for c, ms in by_cfg.items() if ms <= min(by_cfg.values()) * (1 + tolerance)}
        for launch, by_cfg in timings.items()
    }
    chosen: list[str] = []
    uncovered = set(good)
    while uncovered:
        # Most launches covered; ties broken by the summed time over all launches (lower wins).
        best = max(
            {c for launch in uncovered for c in good[launch]},
            key=lambda c: (sum(c in good[x] for x in uncovered), -sum(t.get(c, 1e9) for t in timings.values())),
        )
        chosen.append(best)
        uncovered = {x for x in uncovered if best not in good[x]}
    return chosen


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    import torch

    if args.smoke and not torch.cuda.is_available():
        if "fastcog.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--smoke on CPU: fastcog.kernels was imported without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/kernel_sweep.py needs a CUDA GPU (use --smoke for a CPU check)")

    import triton
    from fastcog.kernels import lora_linear

    lora = importlib.import_module("fastcog.kernels.lora_linear")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuned = lora._fused_mm_tuned
    bench = wall_clock_bench if dev.type == "cpu" else triton.testing.do_bench
    if dev.type == "cpu":
        tuned.do_bench = wall_clock_bench  # the autotuner's own timer needs CUDA events

    if args.smoke:
        m, rank, shapes, candidates, splits = 37, 8, [("48->80", 48, 80)], SMOKE_CANDIDATES, [1, 4]
    else:
        m, rank = args.tokens, args.rank
        shapes = [("3072->3072", 3072, 3072), ("3072->12288", 3072, 12288), ("12288->3072", 12288, 3072)]
        candidates, splits = CANDIDATES, SPLITS
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in candidates
    ]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16)
        return t.requires_grad_(grad)

    timings: list[Timing] = []
    per_launch: dict[str, dict[str, float]] = {}
    split_rows: list[tuple[str, str, float]] = []
    saved = (tuned.configs, dict(tuned.cache), lora.pick_split_k)
    try:
        for name, k, n in shapes:
            x, w, b = rnd(m, k, grad=True), rnd(n, k, std=k**-0.5), rnd(n)
            a, bb = rnd(rank, k, std=k**-0.5, grad=True), rnd(n, rank, std=rank**-0.5, grad=True)
            dy = rnd(m, n)

            def step(x=x, w=w, b=b, a=a, bb=bb, dy=dy) -> object:
                return torch.autograd.grad(lora_linear(x, w, b, a, bb, 0.5), (x, a, bb), dy)

            # 1. every candidate on every launch, timed by the autotuner itself.
            tuned.configs, tuned.cache, lora.pick_split_k = configs, {}, saved[2]
            seen: set = set()
            original_run = tuned.run

            def recording_run(*r_args, _orig=original_run, _name=name, _seen=seen, **r_kwargs):
                result = _orig(*r_args, **r_kwargs)
                for key in set(tuned.cache) - _seen:
                    _seen.add(key)
                    mm, nn, k1, k2, has_second, _, split = key[:7]
                    launch = f"{mm}x{nn}x{k1}" + (f"+{k2}" if has_second else "") + f" split{split}"
                    flops = 2.0 * mm * nn * (k1 + (k2 if has_second else 0))
                    for cfg, t in tuned.configs_timings.items():
                        ms = t[0] if isinstance(t, list | tuple) else float(t)
                        timings.append(Timing(_name, launch, label(cfg), ms, flops / (ms * 1e-3) / 1e12))
                        per_launch.setdefault(f"{_name} {launch}", {})[label(cfg)] = ms
                return result

            tuned.run = recording_run
            try:
                step()
            finally:
                del tuned.run  # back to the class's method
            # 2. split-K of the weight-gradient GEMMs, whole forward + backward, tuned configs.
            tuned.configs, tuned.cache = saved[0], {}
            for split in [None, *splits]:
                if split is None:
                    lora.pick_split_k = saved[2]
                else:
                    lora.pick_split_k = lambda mm, nn, kk, device, _s=split: _s
                step()  # autotune outside the timing
                p50 = bench(step, quantiles=(0.5, 0.2, 0.8))[0]
                split_rows.append((name, "heuristic" if split is None else str(split), p50))
    finally:
        tuned.configs, tuned.cache, lora.pick_split_k = saved[0], saved[1], saved[2]
        if dev.type == "cpu":
            tuned.__dict__.pop("do_bench", None)

    recommended = cover(per_launch, args.tolerance)
    write(args, dev, timings, per_launch, recommended, split_rows, torch.__version__, triton.__version__)
    return {"timings": timings, "recommended": recommended, "splits": split_rows}


def write(args, dev, timings, per_launch, recommended, split_rows, torch_v: str, triton_v: str) -> None:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("kernel_sweep_smoke" if args.smoke else "kernel_sweep")
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU, Triton interpreter"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"{hardware}; torch {torch_v}; triton {triton_v}; {date}; M={args.tokens if not args.smoke else 37}"
    with open(f"{stem}.csv", "w", newline="") as f:
        f.write(f"# {meta}\n")
        if args.smoke:
            f.write(f"# {SMOKE_NOTE}\n")
        writer = csv.writer(f)
        writer.writerow(["shape", "launch", "config", "p50_ms", "tflops"])
        for t in timings:
            writer.writerow([t.shape, t.launch, t.config, f"{t.p50_ms:.5f}", f"{t.tflops:.2f}"])
    lines = ["# fused LoRA GEMM block-size sweep", ""]
    if args.smoke:
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += [
        f"- {meta}",
        "- timer: Triton's autotuner (do_bench p50) per launch; split-K rows: do_bench p50 of forward + backward",
        f"- recommended `_CONFIGS` (every launch within {args.tolerance:.0%} of its best): "
        + ", ".join(f"`{c}`" for c in recommended),
        "",
        "| launch | best config | best ms | TFLOP/s | recommended's best ms | current list's best ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    current = {label(c) for c in importlib.import_module("fastcog.kernels.lora_linear")._CONFIGS}
    best_tflops = {(f"{t.shape} {t.launch}", t.config): t.tflops for t in timings}
    for launch, by_cfg in per_launch.items():
        cfg = min(by_cfg, key=by_cfg.get)
        rec = min(by_cfg[c] for c in recommended if c in by_cfg)
        cur = [by_cfg[c] for c in current if c in by_cfg]
        cur_ms = f"{min(cur):.4f}" if cur else "-"
        lines.append(
            f"| {launch} | {cfg} | {by_cfg[cfg]:.4f} | {best_tflops[(launch, cfg)]:.1f} | {rec:.4f} | {cur_ms} |"
        )
    lines += ["", "| shape | split-K of dA / dB | fwd+bwd p50 ms |", "|---|---|---:|"]
    lines += [f"| {shape} | {split} | {ms:.4f} |" for shape, split, ms in split_rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
