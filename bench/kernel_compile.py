"""Compile every fastcog Triton launch of a real-shape step for a GPU target, on any machine.

The CPU test tier runs the kernels under the Triton interpreter, which never compiles them: a
kernel can pass every parity test and still fail to compile for a GPU, spill registers, or
ask for more shared memory than a block may have. This script closes that gap without a GPU.
It installs a Triton driver that knows a target (sm_90 by default) but has no device, runs a
real forward + backward on CPU tensors of the real shapes (one case per CogVideoX linear shape,
rank 128, and fastcog.fast.qkv's fused q/k/v: 3072 -> 9216, rank 384) of ``lora_linear`` (bf16)
and ``lora_linear_fp8`` (FP8 base, tensorwise and rowwise recipes; the fused q/k/v rowwise only),
and of ``add_noise`` / ``velocity_mse_loss``, and catches every kernel launch in Triton's
``jit_cache_hook``: the launch's real specialization (dtypes, 16-divisible sizes and strides,
constexprs) is compiled for the target and then skipped, so nothing runs and the outputs are
garbage. Each autotuner offers every config it would time for that launch (its own list, after
its pruning), with a stand-in timer. For every launch and config it reports:

* registers per thread and spill bytes (ptxas -v on the generated PTX),
* shared memory per block against the target's limit,
* the MMA instructions (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80) with their operand
  types (FP8 GEMMs must run FP8 MMAs: e4m3 x e4m3, e5m2 x e4m3),
* whether the K loop is software-pipelined (``cp.async`` / bulk copies in the PTX),
* the K loops specialised as whole tiles (``EVEN_*`` constexprs true: no K mask) and the PTX's
  compare (``setp``) instructions; the full run adds the first shape with every ``EVEN_*`` forced
  off, so the report shows the compares the K masks cost, and
* the programs the launch starts and the share of SM-time they fill on the target's SMs
  (programs / (SMs x ceil(programs / SMs)): arithmetic, not a measurement).

This is a static check: it says a config can run well, never how fast it runs. The block
size sweep itself (bench/kernel_sweep.py) needs the GPU; this prunes its candidates and
keeps CI honest about native compilation. sm_80 has no FP8 MMA: the FP8 launches are skipped there.

    python bench/kernel_compile.py                       # sm_90, every case, every config tuned
    python bench/kernel_compile.py --arch 80 --check     # exit 1 on a spill / smem / MMA / pipelining failure
    python bench/kernel_compile.py --cases ci --configs 128x128x64:8:3,64x64x64:4:4
    python bench/kernel_compile.py --sweep-candidates --tag sweep_candidates   # what kernel_sweep.py may time

Must run without TRITON_INTERPRET=1 (the kernels must be defined as compiled kernels).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # kernel_compile_lib, also when loaded by file path (tests)
from kernel_compile_lib import (  # noqa: E402
    NUM_SMS,
    SMEM_LIMIT,
    Launch,
    Recorder,
    config_label,
    install,
)

__all__ = ["config_label", "main", "parse_configs", "run", "write"]

FP8_SKIP = {80: "sm_80 has no FP8 MMA (FP8 tensor-core MMAs and Triton's e4m3 type need sm_89 or newer)"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT), help="compute capability x10")
    p.add_argument("--cases", default="full", choices=["full", "ci"], help="ci: the 3072->3072 shape and the loss only")
    p.add_argument(
        "--configs",
        default="",
        help="fused_mm configs to compile instead of the kernel's autotune list, comma separated "
        "BLOCK_MxBLOCK_NxBLOCK_K:num_warps:num_stages (GROUP_M 8), each on every launch of the bf16 step",
    )
    p.add_argument("--sweep-candidates", action="store_true",
                   help="compile bench/kernel_sweep.py's candidates of every kernel, each on every launch")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--check", action="store_true", help="exit 1 when any launch fails a check")
    return p.parse_args(argv)


def parse_configs(text: str) -> list:
    import triton

    configs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+):(\d+):(\d+)", item)
        if not m:
            raise SystemExit(f"--configs: {item!r} is not BLOCK_MxBLOCK_NxBLOCK_K:num_warps:num_stages")
        bm, bn, bk, warps, stages = map(int, m.groups())
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


MASKED = " [EVEN_* forced off]"


def _lora_steps(recorder: Recorder, label: str, k: int, n: int, r: int, recipes: tuple, suffix: str = "") -> None:
    """Forward + backward of lora_linear (bf16) and of lora_linear_fp8 under each of ``recipes``, on zeros of
    the real shapes: 17,776 tokens, in k, out n, rank r."""
    import torch
    from fastcog.kernels import lora_linear, lora_linear_fp8

    m, dt, e4m3 = 17_776, torch.bfloat16, torch.float8_e4m3fn
    x = torch.zeros(m, k, dtype=dt, requires_grad=True)
    w, b = torch.zeros(n, k, dtype=dt), torch.zeros(n, dtype=dt)
    a = torch.zeros(r, k, dtype=dt, requires_grad=True)
    bb = torch.zeros(n, r, dtype=dt, requires_grad=True)
    recorder.case = f"lora {label} r{r} bf16{suffix}"
    dy = torch.zeros(m, n, dtype=dt)
    lora_linear(x, w, b, a, bb, 1.0).backward(dy)
    w8, wt8 = torch.zeros(n, k, dtype=e4m3), torch.zeros(k, n, dtype=e4m3)
    for recipe in recipes:
        inv = (torch.ones(1, n), torch.ones(1, k)) if recipe == "rowwise" else (torch.ones(()), torch.ones(()))
        recorder.case = f"lora {label} r{r} fp8 {recipe}{suffix}"
        lora_linear_fp8(x, w8, inv[0], wt8, inv[1], b, a, bb, 1.0, recipe).backward(dy)


def run(args: argparse.Namespace) -> tuple[list[Launch], list[str]]:
    """(launches, notes): every launch compiled, and a line per group of launches skipped, with why."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench/kernel_compile.py compiles kernels: unset TRITON_INTERPRET")
    import torch

    lora = importlib.import_module("fastcog.kernels.lora_linear")
    fp8 = importlib.import_module("fastcog.kernels.lora_linear_fp8")
    loss = importlib.import_module("fastcog.kernels.diffusion_loss")
    from fastcog.kernels import add_noise, velocity_mse_loss
    from fastcog.kernels.reference import cogvideox_alphas_cumprod

    recorder = Recorder(args.arch)
    tuners = [lora._fused_mm_tuned, fp8._quant_lora_tuned, fp8._fp8_lora_mm_tuned]
    lists = [parse_configs(args.configs) if args.configs else None, None, None]
    if args.sweep_candidates:
        import kernel_sweep  # beside this file

        lists = [kernel_sweep.configs(kernel_sweep.CANDIDATES, "mm"),
                 kernel_sweep.configs(kernel_sweep.QUANT_CANDIDATES, "quant"),
                 kernel_sweep.configs(kernel_sweep.FP8_MM_CANDIDATES, "fp8")]  # fmt: skip
    undo = install(recorder, [lora, fp8, loss], tuners, lists)
    num_sms = lora._num_sms
    lora._num_sms = lambda device: NUM_SMS[args.arch]  # the split-K heuristic sees the target's SM count
    notes = [f"lora_linear_fp8 launches skipped: {FP8_SKIP[args.arch]}."] if args.arch in FP8_SKIP else []
    if args.configs and not notes:  # its fused_mm launches (dA, dB) are the bf16 step's: nothing new to compile
        notes.append("lora_linear_fp8 launches skipped: --configs sets fused_mm's configs only.")
    both = () if notes else ("tensorwise", "rowwise")
    try:
        # (label, in, out, rank, FP8 recipes). fastcog.fast.qkv's fused q/k/v: one GEMM over the concatenated
        # weights with the three adapters as one of rank 3r (plain or rowwise-FP8 bases only).
        shapes = [("q/k/v/out 3072->3072", 3072, 3072, 128, both)]
        if args.cases == "full":
            shapes += [("ff up 3072->12288", 3072, 12288, 128, both), ("ff down 12288->3072", 12288, 3072, 128, both)]
        if args.cases == "full" and not args.sweep_candidates:  # the sweep times the three shapes above
            shapes.append(("fused q/k/v 3072->9216", 3072, 9216, 384, both[1:]))
        for shape in shapes:
            _lora_steps(recorder, *shape)
        if args.cases == "full" and lists == [None, None, None]:
            # The first shape again with every EVEN_* constexpr false, for the K-mask comparison of the report.
            heuristics = [tuner.fn.values for tuner in tuners]
            saved = [dict(values) for values in heuristics]
            for values in heuristics:
                values.update(dict.fromkeys(values, lambda _: False))
            try:
                _lora_steps(recorder, *shapes[0], suffix=MASKED)
            finally:
                for values, before in zip(heuristics, saved, strict=True):
                    values.update(before)
        recorder.case = "loss 49x480x720 (1x13x16x60x90) bf16"
        shape, dt = (1, 13, 16, 60, 90), torch.bfloat16
        z0, eps = torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)
        t = torch.tensor([500])
        abar = cogvideox_alphas_cumprod()
        xt = add_noise(z0, eps, t, abar)
        v = torch.zeros(shape, dtype=dt, requires_grad=True)
        velocity_mse_loss(v, xt, z0, t, abar).backward()
        return recorder.finish(), notes  # before the undo: the compiles use the target-only driver
    finally:
        lora._num_sms = num_sms
        undo()


def _mask_table(launches: list[Launch]) -> list[str]:
    """Markdown: each launch of the first shape with whole-tile K loops against itself with EVEN_* forced off."""
    masked = [x for x in launches if x.case.endswith(MASKED)]
    if not masked:
        return []
    pairs, taken = [], set()
    for x in masked:  # the n-th masked twin of a (case, kernel, shape, config) pairs with the n-th original
        same = [i for i, y in enumerate(launches) if i not in taken and (y.case + MASKED, y.kernel, y.shape,
                y.config) == (x.case, x.kernel, x.shape, x.config)]  # fmt: skip
        if same and launches[same[0]].even_k != "-":
            taken.add(same[0])
            pairs.append((launches[same[0]], x))
    lines = [
        "", "## K masks", "",
        "The first shape's launches with whole-tile K loops, compiled as launched and with every EVEN_* "
        "constexpr forced off (the K masks on): PTX compare instructions (setp) and registers.", "",
        "| case | kernel | shape | config | whole-tile K | setp | setp, masks on | regs | regs, masks on |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for x, y in pairs:
        lines.append(f"| {x.case} | {x.kernel} | {x.shape} | {x.config} | {x.even_k} | {x.setp} | {y.setp} "
                     f"| {x.regs} | {y.regs} |")  # fmt: skip
    return lines


def _summary(launches: list[Launch]) -> list[str]:
    """Markdown: per kernel, the extremes over its launches x configs."""
    lines = [
        "| kernel | launches x configs | regs, max | spill B, max | smem B, max | MMA operands | pipelined "
        "| whole-tile K | SM fill, min |",
        "|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for kernel in dict.fromkeys(x.kernel for x in launches):
        xs = [x for x in launches if x.kernel == kernel]
        operands = dict.fromkeys(t.split(":")[0] for x in xs for t in x.mma_types.split("; ") if t)
        fills = [x.sm_fill for x in xs if x.programs]
        lines.append(
            f"| {kernel} | {len(xs)} | {max(x.regs for x in xs)} | {max(x.spill_bytes for x in xs)} "
            f"| {max(x.smem_bytes for x in xs)} | {', '.join(operands) or '-'} "
            f"| {sum(x.pipelined for x in xs)} of {len(xs)} | {sum(x.even_k != '-' for x in xs)} of {len(xs)} "
            f"| {f'{min(fills):.0%}' if fills else '-'} |"
        )
    return lines


def write(launches: list[Launch], notes: list[str], args: argparse.Namespace) -> Path:
    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_compile_sm{args.arch}_triton{triton.__version__}{'_' + args.tag if args.tag else ''}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(launches[0])))
        writer.writeheader()
        writer.writerows(asdict(x) for x in launches)
    step = [x for x in launches if not x.case.endswith(MASKED)]
    bad, masked = [x for x in step if x.problems], len(step) < len(launches)
    lines = [
        f"# Native compile check, sm_{args.arch} (no GPU needed)",
        "",
        f"{_dt.date.today().isoformat()}; triton {triton.__version__}, torch {torch.__version__}; "
        f"`python bench/kernel_compile.py --arch {args.arch} --cases {args.cases}"
        + (f" --configs {args.configs}" if args.configs else "")
        + (" --sweep-candidates" if args.sweep_candidates else "")
        + "`",
        "",
        "Static facts from compiling each launch of a real-shape forward + backward for the target, with "
        "every config its autotuner would time: registers and spills (ptxas -v), shared memory per block "
        f"(limit {SMEM_LIMIT[args.arch]} B), MMA instructions and their operand types, async (pipelined) "
        "loads, the K loops specialised as whole tiles (EVEN_*: no K mask) and the PTX's compare (setp) "
        f"instructions, the programs launched and the share of SM-time they can fill on {NUM_SMS[args.arch]} "
        "SMs (programs / (SMs x ceil(programs / SMs)), arithmetic). Not a timing.",
        "",
        *[f"{note}\n" for note in notes],
        f"**{len(step)} launches"
        + (f" (and {len(launches) - len(step)} compiled with the K masks on: K masks, below)" if masked else "")
        + f", {len(bad)} with problems.**",
        "",
        *_summary(step),
        "",
        "| case | kernel | shape | config | regs | spill B | smem B | MMA | MMA operands | pipelined | whole-tile K "
        "| setp | programs | SM fill | problems |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|",
    ]
    for x in step:
        lines.append(
            f"| {x.case} | {x.kernel} | {x.shape} | {x.config} | {x.regs} | {x.spill_bytes} | {x.smem_bytes} "
            f"| {x.mma} | {x.mma_types or '-'} | {'yes' if x.pipelined else 'no'} | {x.even_k} | {x.setp} "
            f"| {x.programs or '-'} | {f'{x.sm_fill:.0%}' if x.programs else '-'} | {x.problems or '-'} |"
        )
    Path(f"{stem}.md").write_text("\n".join(lines + _mask_table(launches)) + "\n")
    return stem


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    launches, notes = run(args)
    stem = write(launches, notes, args)
    # The launches of the step: the K-mask twins are a comparison, not code that runs.
    bad = [x for x in launches if x.problems and not x.case.endswith(MASKED)]
    for x in launches:
        status = x.problems or "ok"
        print(f"{x.case:<40} {x.kernel:<22} {x.shape:<22} {x.config:<16} regs {x.regs:>4} smem {x.smem_bytes:>7} "
              f"{status}")  # fmt: skip
    print(*notes, sep="\n")
    print(f"{len(launches)} launches compiled for sm_{args.arch}, {len(bad)} with problems; wrote {stem}.md / .csv")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
