"""`fastcog train | prepare | plan | sample | plot | make-tiny` : parse, load config, call. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fastcog import __version__
from fastcog.errors import FastcogError
from fastcog.stop import EXIT_PREEMPTED, Preempted

# Lines libraries log while being imported, on every command, that are not errors for fastcog:
# (logger, substrings the message must all hold). Each drops one known message, nothing else.
IMPORT_NOISE = (
    # torchao's optional compiled extensions (MX-FP8, CUTLASS sm90a kernels) built for another
    # Python or GPU; fastcog calls none of them (its FP8 matmuls are torch._scaled_mm).
    ("torchao", ("Failed to load ", "torchao", "_C")),
    # torch deprecates registering Enum classes with pytree, which torchao still does at import.
    ("torch.utils._pytree", ("is an Enum subclass and is now natively supported by torch.compile",)),
    # bitsandbytes' optional 4-bit CPU GEMM from the `kernels` hub; fastcog uses only its 8-bit AdamW.
    ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward",)),
)


class _DropMessage(logging.Filter):
    def __init__(self, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(part in message for part in self.parts)


def _filter_import_noise() -> None:
    """Installed before the libraries are imported (loggers exist before their modules do)."""
    for name, parts in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.parts == parts for f in logger.filters):
            logger.addFilter(_DropMessage(parts))


def _quiet_libraries() -> None:
    _filter_import_noise()
    # diffusers / transformers print per-file progress bars and advice on every load; the
    # trainer shows its own progress.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _cmd_train(args: argparse.Namespace) -> int:
    from fastcog.config import load_config
    from fastcog.trainer import train

    cfg = load_config(args.config, args.set or ())
    _quiet_libraries()
    summary = train(cfg)  # joins torchrun's process group, if launched by torchrun
    return _finish_distributed(summary.lines())


def _cmd_prepare(args: argparse.Namespace) -> int:
    from fastcog.build import seed_everything
    from fastcog.config import load_config
    from fastcog.data.prepare import cache_dir_for, prepare
    from fastcog.inputs import check_inputs, make_encoder_factory, write_demo_data
    from fastcog.parallel import device_for, init_distributed, shutdown_distributed

    cfg = load_config(args.config, args.set or ())
    _quiet_libraries()
    world = init_distributed(cfg.parallel.timeout_s)
    write_demo_data(cfg, world)
    variant, samples = check_inputs(cfg, training=False)
    seed_everything(cfg.train.seed)
    device = device_for(world)
    result = prepare(cfg, samples, variant.is_i2v, make_encoder_factory(cfg, device, variant), world,
                     show_progress=cfg.log.progress_bar)
    if world.is_main:
        print(result.summary(cache_dir_for(cfg)))
    shutdown_distributed()
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from fastcog.models import make_tiny

    _quiet_libraries()
    out = make_tiny(args.variant, args.out_dir, seed=args.seed, height=args.height, width=args.width,
                    frames=args.frames, overwrite=args.overwrite)
    print(f"wrote a tiny random {args.variant} checkpoint to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fastcog.plot import write_plot

    print(f"wrote {write_plot(args.run_dir, args.out)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from fastcog.config import load_config
    from fastcog.gpus import gpu_by_key
    from fastcog.plan_report import as_json, auto_strategy, lines, make_plan, remedies

    cfg = load_config(args.config, args.set or ())
    _quiet_libraries()
    gpu = gpu_by_key(args.gpu)
    strategies = ("fsdp", "ddp") if args.nproc > 1 else ("none",)
    plans = [make_plan(cfg, gpu, args.nproc, strategy, args.variant) for strategy in strategies]
    fixes = [[] if p.fits else remedies(cfg, p) for p in plans]
    auto = auto_strategy(cfg, gpu, args.nproc, plans[1])[:2] if args.nproc > 1 else None
    if args.json:
        out = [as_json(cfg, p, f) for p, f in zip(plans, fixes)]
        for plan in out if auto else ():
            plan["auto_strategy"] = {"strategy": auto[0], "why": auto[1]}
        print(json.dumps(out, indent=1))
    else:
        print("\n\n".join("\n".join(lines(cfg, p, f)) for p, f in zip(plans, fixes)))
        if auto:
            print(f"\nparallel.strategy: auto picks {auto[0]}: {auto[1]}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from fastcog.sample import SampleOptions, sample

    _quiet_libraries()
    values = {f.name: getattr(args, f.name) for f in fields(SampleOptions)}
    opts = SampleOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    result = sample(opts)  # joins torchrun's process group, if launched by torchrun
    return _finish_distributed(result.lines())


def _finish_distributed(summary: list[str]) -> int:
    """Rank 0 prints the summary; every rank leaves torchrun's process group."""
    from fastcog.parallel import current_world, shutdown_distributed

    if current_world().is_main:
        print("\n".join(summary))
    shutdown_distributed()
    return 0


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    from fastcog.config_schema import ValidationConfig
    from fastcog.dtypes import DTYPES

    v = ValidationConfig()  # the defaults validation renders with (the reference trainer's)
    p.add_argument("run", nargs="?", help="a `fastcog train` output folder (its config.yaml and exported LoRA or "
                   "transformer), or one of its checkpoint-<step> folders")
    p.add_argument("--model", help="base diffusers CogVideoX folder (default: the run's model.path)")
    p.add_argument("--lora", help="a LoRA file (or its folder) to load instead of the run's")
    p.add_argument("--lora-scale", type=float, help="LoRA strength: 1 as trained, 0 the base model (default 1)")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable); default: --prompts-file, else the run's validation.prompts")
    p.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="FILE",
                   help="I2V: the first frame, one for every prompt or one per prompt (repeatable)")
    p.add_argument("--steps", type=int, default=v.num_inference_steps,
                   help=f"sampler steps (default {v.num_inference_steps})")
    p.add_argument("--guidance-scale", type=float, default=v.guidance_scale,
                   help=f"classifier-free guidance (default {v.guidance_scale:g})")
    p.add_argument("--seed", type=int, default=v.seed,
                   help=f"seed of the first prompt, +1 per prompt (default {v.seed})")
    p.add_argument("--frames", type=int, help="frames, 8N+1 (default: the run's data.num_frames)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: the run's data.height)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: the run's data.width)")
    p.add_argument("--fps", type=int, default=v.fps, help=f"frame rate of the mp4 (default {v.fps})")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/samples, or ./samples)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and compute dtype (default: the run's model.dtype, "
                   "else bf16)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    p.add_argument("--vae-slicing", action="store_true",
                   help="VAE slicing (a batch one video at a time; each prompt is its own batch here)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep each model on the CPU until it runs (diffusers' model CPU offload; needs a GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="path to a YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.train_steps=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from fastcog.gpus import GPU_KEYS
    from fastcog.variants import VARIANTS

    parser = argparse.ArgumentParser(prog="fastcog", description="Fast CogVideoX fine-tuning.")
    parser.add_argument("--version", action="version", version=f"fastcog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("prepare", help="encode the dataset into the latent/embedding cache (torchrun-aware)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("plan", help="memory, FLOPs and step time of a config on a GPU, worked out without one")
    _add_config_args(p)
    p.add_argument("--gpu", default="h100-80gb", choices=GPU_KEYS, help="the GPU to plan for (default h100-80gb)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run: per-rank figures for FSDP2 and DDP")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (bytes as integers)")
    p.add_argument("--variant", choices=VARIANTS, help="plan with this released checkpoint's architecture when "
                   "model.path has no transformer/config.json (not downloaded yet)")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("sample", help="render videos from a trained run (or a model and LoRA): mp4 and PNG "
                       "contact sheets (torchrun-aware)")
    _add_sample_args(p)
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("make-tiny", help="write a tiny random diffusers checkpoint of a variant")
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUT_DIR even if it is not empty (files of the same name are replaced)")
    p.set_defaults(func=_cmd_make_tiny)
    p = sub.add_parser("plot", help="draw a run's loss, learning rate, gradient norm and throughput (metrics.jsonl) "
                       "to a PNG")
    p.add_argument("run_dir", help="a run's train.output_dir (it holds metrics.jsonl)")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/metrics.png)")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Preempted as err:  # a checkpoint was written: not an error, but not finished either
        from fastcog.parallel import shutdown_distributed

        print(f"fastcog: {err}", file=sys.stderr)
        shutdown_distributed()
        return EXIT_PREEMPTED
    except FastcogError as err:
        print(f"fastcog: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastcog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
