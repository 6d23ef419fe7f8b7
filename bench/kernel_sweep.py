"""Block-size sweep of the fused LoRA kernels (fastcog.kernels.lora_linear, lora_linear_fp8) on the GPU at hand.

``lora_linear`` runs every product of its forward and backward through one Triton kernel,
``_fused_mm_kernel``, autotuned over a short config list (``_CONFIGS`` in kernels/lora_linear.py)
except the rank-sized products (S', G', dA, dB), which run ``_RANK_CONFIG`` alone. ``lora_linear_fp8``
adds two kernels with their own lists (kernels/lora_linear_fp8.py): the quantise pass
(``_QUANT_CONFIGS``) and the FP8 GEMM (``_MM_CONFIGS``). This script chooses those lists by measurement:

1. For each CogVideoX linear shape (M = 17,776 tokens, rank 128, bf16) it runs one forward +
   backward of ``lora_linear`` with a wide candidate list as the autotune set and no pruning.
   Triton's autotuner then times every candidate on every distinct launch (do_bench, p50) and
   the script records those timings from the autotuner.
2. It picks the fewest configs that keep every launch within ``--tolerance`` (default 3%) of
   its own best (greedy set cover): the recommended ``_CONFIGS`` (over the launches that list serves)
   and ``_RANK_CONFIG`` (over the rank-sized ones).
3. It times the whole forward + backward with each forced split-K value for the weight-
   gradient GEMMs (dA, dB, which reduce over 17,776 tokens into few output tiles), against
   the heuristic ``pick_split_k``.
4. On a GPU with FP8 MMAs (sm_89 and newer), the same as 1 and 2 for ``lora_linear_fp8`` under both
   recipes: every candidate of each FP8 kernel on each of its launches, the recommended
   ``_QUANT_CONFIGS`` and ``_MM_CONFIGS`` (its dA, dB are ``fused_mm`` launches, swept in 1).

Writes ``kernel_sweep.csv`` (one row per launch x config) and ``kernel_sweep.md`` (hardware,
versions, date, the per-launch best, the recommendations, the split-K table) to ``--out``.

``--smoke``: tiny shapes and two configs per kernel on CPU through the Triton interpreter with a
wall-clock timer (FP8: the tensorwise recipe only), to check that the script runs. Its numbers
are NOT performance claims.

    python bench/kernel_sweep.py                  # GPU
    python bench/kernel_sweep.py --smoke --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
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
# FP8 GEMM (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages; BLOCK_R 64): FP8 K blocks of 64 / 128 bytes
# (wgmma's FP8 K step is 32). Quantise pass (BLOCK_M, BLOCK_K, warps, stages): 64-row blocks (wgmma's M)
# and the 128-row ones. Compiled for sm_90 without spills: bench/kernel_compile.py --sweep-candidates
# (128 x 256 x 128 spills in the dx GEMM, which promotes its sums to fp32 every BLOCK_K: left out).
FP8_MM_CANDIDATES = [
    (128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (256, 128, 128, 8, 3),
    (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4),
]  # fmt: skip
QUANT_CANDIDATES = [(64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3), (128, 64, 8, 3)]
# Smoke: blocks that still cross the tiny shapes' edges, large enough to keep the interpreter's launches few.
SMOKE_CANDIDATES = [(32, 32, 32, 4, 1), (64, 64, 32, 4, 1)]
SMOKE_FP8_MM_CANDIDATES = [(32, 32, 32, 4, 1), (64, 64, 32, 4, 1)]
SMOKE_QUANT_CANDIDATES = [(32, 32, 4, 1), (64, 16, 4, 1)]
SPLITS = [1, 2, 4, 8, 16]
# The config list each group of launches serves, as the kernels' modules name it.
LISTS = {"fused_mm": "_CONFIGS", "fused_mm rank-sized": "_RANK_CONFIG", "quantise": "_QUANT_CONFIGS",
         "fp8 gemm": "_MM_CONFIGS"}  # fmt: skip


@dataclass
class Timing:
    shape: str  # the case, e.g. "3072->3072" or "3072->3072 fp8 rowwise"
    kernel: str  # a key of LISTS
    launch: str  # M x N x K (+ the LoRA K), and what tells the launch apart
    config: str  # BLOCK_MxBLOCK_NxBLOCK_K:warps:stages (the quantise pass: BLOCK_MxBLOCK_K)
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
    dims = "x".join(str(cfg.kwargs[d]) for d in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if d in cfg.kwargs)
    return f"{dims}:{cfg.num_warps}:{cfg.num_stages}"


def configs(candidates: list[tuple], kind: str, block_r: int = 64) -> list:
    """triton.Configs of a candidate list; kind "mm" (fused_mm), "fp8" (the FP8 GEMM, with block_r) or "quant"."""
    import triton

    out = []
    for c in candidates:
        if kind == "quant":
            meta = {"BLOCK_M": c[0], "BLOCK_K": c[1]}
        else:
            meta = {"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2], "GROUP_M": 8}
            if kind == "fp8":
                meta["BLOCK_R"] = block_r
        out.append(triton.Config(meta, num_warps=c[-2], num_stages=c[-1]))
    return out


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


def describe(key: tuple, kind: str, rank_sized: int) -> tuple[str, str, float]:
    """(kernel group, launch label, FLOPs) of one autotune key of a kernel (its key list, then the dtypes)."""
    if kind == "mm":
        mm, nn, k1, k2, has_second, _, split = key[:7]
        group = "fused_mm" if has_second or min(mm, nn) > rank_sized else "fused_mm rank-sized"
        launch = f"{mm}x{nn}x{k1}" + (f"+{k2}" if has_second else "") + f" split{split}"
        return group, launch, 2.0 * mm * nn * (k1 + (k2 if has_second else 0))
    if kind == "quant":
        mm, k, r, _, fmax = key[:5]
        fmt = "e4m3" if fmax == 448.0 else "e5m2"
        return "quantise", f"{mm}x{r}x{k} {fmt}", 2.0 * mm * r * k  # the recipe is in the case's name
    mm, nn, k, r, _, fast = key[:6]
    operands = " x ".join(str(d).replace("torch.float8_", "")[:4] for d in key[6:8])
    return "fp8 gemm", f"{mm}x{nn}x{k}+{r} {operands}{' fast' if fast else ''}", 2.0 * mm * nn * (k + r)


@contextlib.contextmanager
def recording(tuned, kind: str, name: str, rank_sized: int, timings: list[Timing],
              per_launch: dict[str, dict[str, dict[str, float]]]) -> Iterator[None]:  # fmt: skip
    """While open, every candidate the autotuner times on a new launch is recorded, without pruning."""
    seen: set = set()
    prune, tuned.early_config_prune = tuned.early_config_prune, None

    def run(*args, **kwargs):
        result = type(tuned).run(tuned, *args, **kwargs)
        for key in set(tuned.cache) - seen:
            seen.add(key)
            group, launch, flops = describe(key, kind, rank_sized)
            for cfg, t in tuned.configs_timings.items():
                ms = t[0] if isinstance(t, list | tuple) else float(t)
                timings.append(Timing(name, group, launch, label(cfg), ms, flops / (ms * 1e-3) / 1e12))
                per_launch.setdefault(group, {}).setdefault(f"{name} {launch}", {})[label(cfg)] = ms
        return result

    tuned.run = run
    try:
        yield
    finally:
        del tuned.run  # back to the class's method
        tuned.early_config_prune = prune


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
    from fastcog.kernels import lora_linear, lora_linear_fp8

    from fastcog.fast.fp8 import E4M3, quantize

    lora = importlib.import_module("fastcog.kernels.lora_linear")
    fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuned = lora._fused_mm_tuned
    fp8_tuned = {"quant": fp8._quant_lora_tuned, "fp8": fp8._fp8_lora_mm_tuned}
    bench = wall_clock_bench if dev.type == "cpu" else triton.testing.do_bench
    if dev.type == "cpu":
        for t in (tuned, *fp8_tuned.values()):
            t.do_bench = wall_clock_bench  # the autotuner's own timer needs CUDA events

    if args.smoke:
        m, rank, shapes, splits, recipes = 37, 8, [("48->80", 48, 80)], [1, 4], ["tensorwise"]
        mm_cfgs, fp8_cfgs = configs(SMOKE_CANDIDATES, "mm"), configs(SMOKE_FP8_MM_CANDIDATES, "fp8", block_r=16)
        quant_cfgs = configs(SMOKE_QUANT_CANDIDATES, "quant")
    else:
        m, rank, splits, recipes = args.tokens, args.rank, SPLITS, ["tensorwise", "rowwise"]
        shapes = [("3072->3072", 3072, 3072), ("3072->12288", 3072, 12288), ("12288->3072", 12288, 3072)]
        mm_cfgs, fp8_cfgs = configs(CANDIDATES, "mm"), configs(FP8_MM_CANDIDATES, "fp8")
        quant_cfgs = configs(QUANT_CANDIDATES, "quant")
    has_fp8 = dev.type == "cpu" or torch.cuda.get_device_capability(dev) >= (8, 9)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16)
        return t.requires_grad_(grad)

    timings: list[Timing] = []
    per_launch: dict[str, dict[str, dict[str, float]]] = {}
    split_rows: list[tuple[str, str, float]] = []
    saved = (tuned.configs, dict(tuned.cache), lora.pick_split_k)
    saved_fp8 = {k: (t.configs, dict(t.cache)) for k, t in fp8_tuned.items()}
    try:
        for name, k, n in shapes:
            x, w, b = rnd(m, k, grad=True), rnd(n, k, std=k**-0.5), rnd(n)
            a, bb = rnd(rank, k, std=k**-0.5, grad=True), rnd(n, rank, std=rank**-0.5, grad=True)
            dy = rnd(m, n)

            def step(x=x, w=w, b=b, a=a, bb=bb, dy=dy) -> object:
                return torch.autograd.grad(lora_linear(x, w, b, a, bb, 0.5), (x, a, bb), dy)

            # 1. every candidate on every launch, timed by the autotuner itself.
            tuned.configs, tuned.cache, lora.pick_split_k = mm_cfgs, {}, saved[2]
            with recording(tuned, "mm", name, lora.RANK_SIZED, timings, per_launch):
                step()
            # 2. split-K of the weight-gradient GEMMs, whole forward + backward, tuned configs.
            tuned.configs, tuned.cache = saved[0], {}
            for split in [None, *splits]:
                if split is None:
                    lora.pick_split_k = saved[2]
                else:
                    lora.pick_split_k = lambda mm, nn, kk, device, _s=split: _s
                if dev.type == "cuda":
                    step()  # autotune outside the timing (the interpreter runs one config: nothing to tune)
                p50 = bench(step, quantiles=(0.5, 0.2, 0.8))[0]
                split_rows.append((name, "heuristic" if split is None else str(split), p50))
            lora.pick_split_k = saved[2]
            # 4. the FP8 base: the FP8 kernels' candidates on each of their launches (dA / dB: fused_mm's list).
            for recipe in recipes if has_fp8 else []:
                rowwise = recipe == "rowwise"
                (w8, w_inv), (wt8, wt_inv) = (quantize(t, E4M3, rowwise) for t in (w, w.t().contiguous()))
                if rowwise:  # Fp8Linear's layout of the per-row scales: [1, out] / [1, in]
                    w_inv, wt_inv = w_inv.reshape(1, -1), wt_inv.reshape(1, -1)
                for kind, t in fp8_tuned.items():
                    t.configs, t.cache = {"quant": quant_cfgs, "fp8": fp8_cfgs}[kind], {}
                with contextlib.ExitStack() as stack:
                    for kind, t in fp8_tuned.items():
                        stack.enter_context(recording(t, kind, f"{name} fp8 {recipe}", 0, timings, per_launch))
                    y = lora_linear_fp8(x, w8, w_inv, wt8, wt_inv, b, a, bb, 0.5, recipe)
                    torch.autograd.grad(y, (x, a, bb), dy)
    finally:
        tuned.configs, tuned.cache, lora.pick_split_k = saved[0], saved[1], saved[2]
        for kind, t in fp8_tuned.items():
            t.configs, t.cache = saved_fp8[kind]
        if dev.type == "cpu":
            for t in (tuned, *fp8_tuned.values()):
                t.__dict__.pop("do_bench", None)

    recommended = {LISTS[group]: cover(launches, args.tolerance) for group, launches in per_launch.items()}
    notes = [] if has_fp8 else ["lora_linear_fp8 not swept: this GPU has no FP8 MMA (sm_89 or newer)"]
    write(args, dev, timings, per_launch, recommended, split_rows, notes, torch.__version__, triton.__version__)
    return {"timings": timings, "recommended": recommended, "splits": split_rows}


def write(args, dev, timings, per_launch, recommended, split_rows, notes, torch_v: str, triton_v: str) -> None:
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
        writer.writerow(["shape", "kernel", "launch", "config", "p50_ms", "tflops"])
        for t in timings:
            writer.writerow([t.shape, t.kernel, t.launch, t.config, f"{t.p50_ms:.5f}", f"{t.tflops:.2f}"])
    lines = ["# fused LoRA kernels: block-size sweep", ""]
    if args.smoke:
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += [f"- {meta}", "- timer: Triton's autotuner (do_bench p50) per launch; split-K rows: do_bench p50 of "
              "forward + backward", *[f"- {note}" for note in notes]]  # fmt: skip
    lora = importlib.import_module("fastcog.kernels.lora_linear")
    fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")
    current = {"_CONFIGS": lora._CONFIGS, "_RANK_CONFIG": [lora._RANK_CONFIG],
               "_QUANT_CONFIGS": fp8._QUANT_CONFIGS, "_MM_CONFIGS": fp8._MM_CONFIGS}  # fmt: skip
    best_tflops = {(f"{t.shape} {t.launch}", t.config): t.tflops for t in timings}
    for group, launches in per_launch.items():
        name, chosen = LISTS[group], recommended[LISTS[group]]
        now = {label(c) for c in current[name]}
        lines += [
            "",
            f"## {group}: recommended `{name}` (every launch within {args.tolerance:.0%} of its best): "
            + ", ".join(f"`{c}`" for c in chosen),
            "",
            f"| launch | best config | best ms | TFLOP/s | recommended's best ms | current `{name}`'s best ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for launch, by_cfg in launches.items():
            cfg = min(by_cfg, key=by_cfg.get)
            rec = min(by_cfg[c] for c in chosen if c in by_cfg)
            cur = [by_cfg[c] for c in now if c in by_cfg]
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
