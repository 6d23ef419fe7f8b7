"""Reference trainer vs fastcog, in one run: step time, throughput, MFU, memory and loss parity.

    python bench/throughput.py                               # GPU: the variant's recipe, 49x480x720
    python bench/throughput.py --variant cogvideox-2b --ablation
    python bench/throughput.py --rows selective,-fast.fp8 --reference-from bench/results/throughput_....json
    python bench/throughput.py --tiny --steps 3 --warmup 1   # CPU check (the default without CUDA)

What runs, with the same seeds, inputs, timesteps and noise in every path: the reference path,
then the rows ``--rows`` lists, in that order.

* ``reference``  the reference trainer's path: diffusers' CogVideoX transformer with random weights
  of the variant's real architecture (or ``--checkpoint``), frozen weights kept in fp32 under
  ``model.dtype`` autocast, peft LoRA adapters in fp32, diffusers' gradient checkpointing on every
  block, diffusers' default attention processor (SDPA), torch AdamW, the reference objective. As
  accelerate runs the reference, only the transformer forward autocasts and its output is used in
  fp32; the latents are noised in the compute dtype and the I2V image in fp32. None of fastcog's
  fast-path code is involved.
* ``fastcog``    the fastcog path the config describes (``fast:``, ``train.activation_checkpointing``,
  ``optim.name`` / ``optim.fused``, frozen weights stored in ``model.dtype``), built with the
  trainer's own ``fastcog.build.parallelize_model``, ``fastcog.objective.make_objective`` and
  ``fastcog.optim.build_optimizer``. The default ``--rows``.
* ``selective``  "fastcog, selective checkpointing": the fastcog path with
  train.activation_checkpointing=selective. ``auto`` picks by the GPU's memory (selective on an
  80 GB H100, none on a 141 GB H200), so a headline measured on the larger GPU can run a policy the
  smaller one cannot; this row measures the other.
* ``leave-one-out`` one row "fastcog - KEY" per switch the fastcog path turns on: the fastcog path
  with that switch back at the reference's value (frozen weights in fp32; checkpointing ``full``).
  Where that leaves an invalid config (selective checkpointing without fastcog's attention), the
  row also takes the checkpointing back to ``full`` and its name says so.
* ``add-one``    one row "reference + KEY=VALUE" per switch: the reference path with that switch on
  (selective checkpointing brings fastcog's attention with it).
* ``-KEY`` / ``+KEY`` one leave-one-out / add-one row. KEY is the switch's section.key
  (``fast.lora_kernel``, ``fast.fp8``, ``train.activation_checkpointing``, ``optim.fused``, ...) or
  ``frozen_storage`` (frozen weights stored in the compute dtype instead of fp32).
* ``--ablation`` is ``--rows fastcog,leave-one-out``. ``--ablation-steps`` sets the timed steps of
  every row other than the reference and fastcog. A row that raises is recorded as
  ``failed: <error>``; once ``--max-seconds`` have passed, the rows left other than the reference
  and the headline row are recorded as skipped.

The headline row is ``fastcog`` when --rows lists it, else the first ``selective`` row, else there
is none (leave-one-out and add-one rows are diagnostics): the top-level parity, speedup and targets
are the headline row's, and so is the exit status. Each path's JSON entry records its
``role`` (reference, fastcog, selective, leave-one-out, add-one) and its ``switches`` relative to
the reference.

Every path executes the same step: forward (transformer under autocast), backward, clip, optimizer step, LR step,
zero_grad. Step k of every path starts from ``torch.manual_seed(seed + k)`` and batch k, so both
paths draw the same timesteps and noise, and every path starts from the same weights: the base
weights from one seeded initialisation (cast to the path's storage dtype), the LoRA adapters drawn
from a seeded host generator by name and shape (A as peft draws it), so any process, on any device
and with any storage dtype, starts from the same adapters.

``--reference-from JSON`` reports the reference path from an earlier run's JSON instead of running it
(the reference is the slowest path: a suite runs the headline once, then reuses its reference).
The earlier run must match: variant, architecture, frames / height / width, batch size, LoRA rank
and alpha, seed, --lora-b-init, tiny / checkpoint, dtype, warm-up steps, the reference's model /
lora / optim config, the device model and the torch / diffusers / peft versions, and it must have
recorded at least the steps the longest row needs; a mismatch is one line naming the field (exit 2).
The rows then use its LR schedule length. Its row is copied into the new JSON as it was, with
``"reused_from"``; parity and speedup are computed against it as usual; the final-LoRA divergence
cannot be (its final adapters are not in the JSON) and is recorded as null with the reason.

Timing: the device is synchronised around every step; the warm-up steps are excluded from p10 /
p50 / p90 and reported apart as "warm-up s" (their time minus as many steady-state p50 steps: the
compile, autotune and allocator warm-up). Throughput uses the p50 step time. Model FLOPs follow
docs/design.md (fastcog.flops.transformer_flops_per_sample: recompute not counted), the same count for
every path, so TFLOP/s ratios equal speedups; MFU divides by the GPU's dense bf16 peak from
fastcog.flops' table. Peak memory is torch.cuda's max allocated / reserved, reset after the
path's model is built (so it is the training peak, weights included); it is not measured on CPU.
Speedup = reference p50 / path p50. Beside the measured peak and p50, each path records its plan
(fastcog.plan_report.make_plan for that path's config, architecture, shape and policy, made once):
the estimated peak (fastcog paths) and, on a GPU of fastcog.gpus, the step-time lower bound (the
executed FLOPs at the datasheet peak), each with its ratio to the measured value; on CPU the step
time is null with the reason.

Attention kernel: the last warm-up step of every path runs under torch.profiler (CPU ops, and CUDA
kernels on a GPU). The path records the attention ops seen (``attention_kernels``: aten ops such as
``aten::_scaled_dot_product_flash_attention_for_cpu`` or ``aten::_scaled_dot_product_cudnn_attention``,
a flash-attn library's custom op, then the top CUDA kernels by time) and a summary
(``attention_kernel``, a table column): the op SDPA or the processor dispatched to, and on a GPU the
busiest attention kernel. A compiled model calls the same aten ops through the dispatcher. With no
warm-up step nothing is recorded. The profiler's overhead falls in that warm-up step only (its time
counts in "warm-up s"), never in the timed steps.

Parity. Per step, the loss and the pre-clip gradient norm of each path against the reference:
|x - x_ref| and |x - x_ref| / |x_ref|. A path passes when both are within the relative tolerance
at every step. The gradient norm is part of the verdict because at random init the loss hardly
depends on the transformer's output (the target's variance dominates it): on the tiny model,
doubling the LoRA scale moved the step-1 loss by 1.6e-5 relative and the gradient norm by 100%.
Tolerances (one per precision, for both quantities):

* fp32 compute: 1e-4. Two correct fp32 implementations that sum in different orders differ by
  about 1e-7 relative here (measured on the tiny model); the rest of the margin covers the slow
  divergence of the LoRA weights over the run (Adam normalises the update, so a gradient element
  near zero whose sign rounding flips moves by 2 x lr).
* bf16: 1e-2, fp16: 5e-3. Autocast rounds the reference's fp32 weights to the compute dtype at every
  matmul, so storing them in that dtype changes nothing; different kernels round intermediates in
  different places (unit roundoff 2^-8 for bf16, 2^-11 for fp16), and a loss or a norm reduced
  over millions of values averages most of that away: expected differences are around 1e-3.
* FP8 base matmuls (e4m3, unit roundoff 2^-4: about 5% rms error per GEMM output) or FP8 weight
  storage: 3e-2. Independent per-element errors of 5% move a norm over N values by about
  0.05 / sqrt(N) + 0.05^2 / 2; 3e-2 leaves room for their accumulation over the blocks.

The bf16, fp16 and FP8 values come from this rounding analysis and are provisional: no GPU run has
calibrated them (the tiny models' CPU runs in bench/results/parity_low_precision_cpu_2026-12-06.md
stay below the bf16 / fp16 values, with other kernels at a far smaller scale). The JSON's
``parity_tolerance`` records which are provisional and the basis of each, the table marks them
"(provisional)"; ``--parity-rtol`` overrides, and the value used is recorded.

The adapters start as peft initialises A, but B starts non-zero (seeded, ``--lora-b-init random``):
with B = 0, as in training, the adapters would not touch the forward pass at step 1, and a wrong
LoRA scale or a broken fused LoRA forward could pass it. Step 1 is therefore the identical-weights
comparison; later steps compare after the same optimizer updates. The final LoRA weights are also
compared (||W_path - W_ref|| / ||W_ref - W_init||, reported, not part of the verdict: with the
reference's LR warm-up the updates are tiny and Adam amplifies rounding in them). Parity over a few
steps cannot see errors whose effect is below the tolerance: the kernel parity suite
(tests/kernels) covers those.

Outputs: a markdown table on stdout; ``<out-dir>/throughput_<variant>_<FxHxW>_<device>_<date>.json``
with hardware, versions, git commit, every path's config and metrics, per-step losses, parity and
speedup (rewritten after every path, so a killed run leaves its partial results, ``"complete":
false``); a PNG of the loss curves and of each path's step time. A CPU run is labelled "CPU run:
not a performance claim".

Exit status: 0 done; 1 a path that had to run here did not: the reference (unless reused) or the
headline row; 2 a bad option or config, or a --reference-from run that does not match; 3 the
headline row ran but failed parity (loss or gradient norm).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

sys.path.append(str(Path(__file__).resolve().parent))  # throughput_lib, also when loaded by file path (tests)

from throughput_lib.common import EXIT_USAGE, RESULTS_DIR, UsageError
from throughput_lib.config import DEFAULT_STEPS, prepare
from throughput_lib.config import RECIPES as RECIPES  # re-exported: the tests check every recipe exists
from throughput_lib.models import setup_bench
from throughput_lib.paths import plan_paths
from throughput_lib.reuse import check_reference, reused_result
from throughput_lib.rows import ABLATION_ROWS, DEFAULT_ROWS, ROW_GROUPS, parse_rows, switch_keys
from throughput_lib.runner import run_benchmark


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage dump
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", help="cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v, cogvideox1.5-5b, "
                   "cogvideox1.5-5b-i2v (default: the config's model.variant, else cogvideox-5b)")
    p.add_argument("--frames", type=int, help="video frames (8N+1); default 49, tiny 9")
    p.add_argument("--height", type=int, help="pixels, multiple of 16; default 480, tiny 64")
    p.add_argument("--width", type=int, help="pixels, multiple of 16; default 720, tiny 96")
    p.add_argument("--batch-size", type=int, help="samples per step (train.batch_size)")
    p.add_argument("--rank", type=int, help="LoRA rank (lora.rank)")
    p.add_argument("--steps", type=int, help="timed steps per path (default GPU 10, CPU 5)")
    p.add_argument("--warmup", type=int, help="warm-up steps per path, not timed (default GPU 3, CPU 2)")
    p.add_argument("--config", type=Path, help="fastcog YAML whose model/lora/optim/train/fast sections define "
                   "the fastcog path (default: the variant's recipe in configs/ on GPU, a CPU setting on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every path (the reference keeps its own fast-path switches)")
    p.add_argument("--fast-only-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for the fastcog path alone (tests: makes parity fail on purpose)")
    p.add_argument("--rows", help=f"comma-separated rows after the reference, run in that order (default "
                   f"{','.join(DEFAULT_ROWS)}): {', '.join(ROW_GROUPS)}, -KEY (fastcog with that switch back at the "
                   f"reference's value), +KEY (the reference with that switch on); KEY: {', '.join(switch_keys())} "
                   f"(frozen_storage: frozen weights stored in the compute dtype instead of fp32)")
    p.add_argument("--ablation", action="store_true", help=f"--rows {','.join(ABLATION_ROWS)}")
    p.add_argument("--ablation-steps", type=int, help="timed steps of every row other than the reference and "
                   "fastcog (default --steps)")
    p.add_argument("--reference-from", type=Path, metavar="JSON", help="take the reference path's results from "
                   "an earlier run's JSON of the same setup instead of running it")
    p.add_argument("--tiny", action="store_true", help="tiny architecture of the variant (the CPU default)")
    p.add_argument("--checkpoint", type=Path, help="local diffusers folder (or its transformer/) to load "
                   "instead of random weights")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--parity-rtol", type=float, help="relative loss tolerance (default by dtype, see the docs)")
    p.add_argument("--lora-b-init", choices=("random", "zero"), default="random",
                   help="LoRA B at step 0: seeded random (default, see the docs) or zero as in training")
    p.add_argument("--seed", type=int, help="default train.seed")
    p.add_argument("--cpu-threads", type=int, default=1, help="CPU runs: torch intra-op threads (default 1: the "
                   "tiny model's ops are too small to share, and on a busy machine a descheduled thread stalls "
                   "every op)")
    p.add_argument("--max-seconds", type=float, help="start no row other than the reference and the headline row "
                   "once this many seconds have passed since the first path started (the rows left are recorded "
                   "as skipped)")
    # argparse reads a value that starts with "-" as an option: "--rows -fast.fp8" means "--rows=-fast.fp8".
    words = iter(sys.argv[1:] if argv is None else argv)
    args = p.parse_args([f"--rows={next(words, '')}" if word == "--rows" else word for word in words])
    for name in ("steps", "ablation_steps", "frames", "height", "width", "batch_size", "rank", "cpu_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup={args.warmup}: must be >= 0")
    if args.parity_rtol is not None and not args.parity_rtol > 0:
        raise UsageError(f"--parity-rtol={args.parity_rtol}: must be > 0")
    if args.checkpoint is not None and args.tiny:
        raise UsageError("--checkpoint and --tiny exclude each other: a checkpoint has its own architecture")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint {str(args.checkpoint)!r} is not a folder")
    if args.config is not None and not args.config.is_file():
        raise UsageError(f"--config {str(args.config)!r} does not exist")
    if args.ablation and args.rows is not None:
        raise UsageError(f"--ablation is --rows {','.join(ABLATION_ROWS)}: give one of them")
    args.rows = parse_rows(args.rows) if args.rows is not None else ABLATION_ROWS if args.ablation else DEFAULT_ROWS
    if args.reference_from is not None and not args.reference_from.is_file():
        raise UsageError(f"--reference-from {str(args.reference_from)!r} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        device, cfg, fast_cfg, variant, source, tiny = prepare(args)
        if device.type == "cpu":
            # Triton kernels run on CPU only under the interpreter, chosen before fastcog.kernels is imported.
            os.environ.setdefault("TRITON_INTERPRET", "1")
            import torch

            torch.set_num_threads(args.cpu_threads)
        steps_default, warmup_default = DEFAULT_STEPS[device.type]
        steps = args.steps or steps_default
        warmup = args.warmup if args.warmup is not None else warmup_default
        paths = plan_paths(cfg, fast_cfg, args, steps)
        schedule = warmup + max(p.steps for p in paths)  # the LR schedule's length in every path
        if args.reference_from is not None:
            _, ref_entry, schedule = check_reference(args.reference_from, args, cfg, paths[0].cfg, variant, tiny,
                                                     warmup, paths, device)
        from fastcog.errors import FastcogError

        try:
            bench = setup_bench(args, cfg, variant, tiny, device, schedule - warmup, warmup)
        except FastcogError as err:
            raise UsageError(str(err)) from None
    except UsageError as err:
        print(f"bench/throughput.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    reused = None if args.reference_from is None else reused_result(paths[0], ref_entry, args.reference_from)
    return run_benchmark(args, argv, bench, cfg, paths, source, reused)


if __name__ == "__main__":
    sys.exit(main())
