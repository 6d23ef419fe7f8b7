"""Reference trainer vs fastcog, in one run: step time, throughput, MFU, memory and loss parity.

    python bench/throughput.py                               # GPU: the variant's recipe, 49x480x720
    python bench/throughput.py --variant cogvideox-2b --ablation
    python bench/throughput.py --tiny --steps 3 --warmup 1   # CPU check (the default without CUDA)

What runs, with the same seeds, inputs, timesteps and noise in every path:

* ``reference``  the reference trainer's path: diffusers' CogVideoX transformer with random weights
  of the variant's real architecture (or ``--checkpoint``), frozen weights kept in fp32 under
  ``model.dtype`` autocast, peft LoRA adapters in fp32, diffusers' gradient checkpointing on every
  block, diffusers' default attention processor (SDPA), torch AdamW, the reference objective. None
  of fastcog's fast-path code is involved.
* ``fastcog``    the fastcog path the config describes (``fast:``, ``train.activation_checkpointing``,
  ``optim.name`` / ``optim.fused``, frozen weights stored in ``model.dtype``), built with
  ``fastcog.fast.apply_fast_path``, ``fastcog.objective.make_objective``, ``fastcog.optim.build_optimizer``.
* ``--ablation`` the reference path plus exactly one of fastcog's switches, one row per switch that
  the fastcog config turns on. A row that raises is recorded as ``failed: <error>``.

Every path executes the same step: forward under autocast, backward, clip, optimizer step, LR step,
zero_grad. Step k of every path starts from ``torch.manual_seed(seed + k)`` and batch k, so both
paths draw the same timesteps and noise, and every path starts from the same weights: the base
weights from one seeded initialisation (cast to the path's storage dtype), the LoRA adapters
copied from the reference path's.

Timing: the device is synchronised around every step; the warm-up steps are excluded from p10 /
p50 / p90 and reported apart as "warm-up s" (their time minus as many steady-state p50 steps: the
compile, autotune and allocator warm-up). Throughput uses the p50 step time. Model FLOPs follow
DESIGN.md (fastcog.metrics.transformer_flops_per_sample: recompute not counted), the same count for
every path, so TFLOP/s ratios equal speedups; MFU divides by the GPU's dense bf16 peak from
fastcog.metrics' table. Peak memory is torch.cuda's max allocated / reserved, reset after the
path's model is built (so it is the training peak, weights included); it is not measured on CPU.
Speedup = reference p50 / path p50.

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
  The low-precision values come from this rounding analysis, not yet from a GPU calibration run;
  ``--parity-rtol`` overrides, and the value used is recorded.

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
speedup (rewritten after every path, so a killed run leaves its partial results); a PNG of the loss
curves and of each path's step time. A CPU run is labelled "CPU run: not a performance claim".

Exit status: 0 done; 1 the reference or the fastcog path failed to run; 2 a bad option or config;
3 the fastcog path ran but failed parity (loss or gradient norm).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config
    from fastcog.variants import VariantSpec

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
CPU_NOTE = ("CPU run: not a performance claim. It checks that the benchmark and every path run and that "
            "the loss parity holds; CPU step times say nothing about GPU speed.")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3

# The shipped recipe whose fast-path settings a GPU run uses when no --config is given.
RECIPES = {
    "cogvideox-2b": "t2v_2b_h100.yaml",
    "cogvideox-5b": "t2v_h100.yaml",
    "cogvideox-5b-i2v": "i2v_h100.yaml",
    "cogvideox1.5-5b": "t2v_1.5_h100.yaml",
    "cogvideox1.5-5b-i2v": "t2v_1.5_h100.yaml",  # no I2V 1.5 recipe: the 1.5 fast-path settings
}
# The CPU default: fp32 (exact enough for a 1e-4 parity check, and the fast dtype on CPU), the
# switches that run on a CPU (Triton kernels under the interpreter). FP8 needs a GPU and bf16;
# torch.compile is left off because compiling on a small shared CPU takes minutes (--set
# fast.compile=true to try it).
CPU_TINY_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"dtype": "fp32"},
    "lora": {"rank": 8, "alpha": 8},
    "fast": {"lora_kernel": True, "fused_loss": True, "attention": "sdpa"},
    "train": {"activation_checkpointing": "none"},
    "optim": {"fused": True},
}
TINY_RESOLUTION = (9, 64, 96)  # frames, height, width: the tiny checkpoints' sample size
FULL_RESOLUTION = (49, 480, 720)
DEFAULT_STEPS = {"cuda": (10, 3), "cpu": (5, 2)}  # (timed steps, warm-up steps)

PARITY_RTOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 5e-3}
FP8_PARITY_RTOL = 3e-2
LORA_B_INIT_RATIO = 0.1
"""--lora-b-init random: B ~ N(0, s^2) with s = ratio / (scale * sqrt(r)). With peft's A (kaiming
uniform, std 1/sqrt(3 in)) and a base weight of the same init, the adapter output is then about
`ratio` times the base linear's output: large enough that a wrong LoRA scale moves the loss."""

# fastcog.config.FastConfig fields that tune a switch rather than being one: every path keeps the
# fastcog config's values, and they get no ablation row.
PARAMETER_FIELDS = {"compile_fullgraph", "fp8_min_features", "memory_margin_gb"}
# The issue's targets, defined for this setup on an H100 / H200.
TARGET_SETUP = {"variant": "cogvideox-5b", "frames": 49, "height": 480, "width": 720, "batch_size": 1,
                "lora_rank": 128}
TARGETS = {"speedup_min": 2.5, "mfu_min": 0.60}


class UsageError(Exception):
    """A bad option or option combination: reported on one line, exit status 2."""


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
    p.add_argument("--ablation", action="store_true", help="also run the reference with each switch on alone")
    p.add_argument("--ablation-steps", type=int, help="timed steps per ablation row (default --steps)")
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
    p.add_argument("--max-seconds", type=float, help="start no ablation row once this many seconds have passed since "
                   "the first path started (the rows left are recorded as skipped); the main paths always run")
    args = p.parse_args(argv)
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
    return args


# --------------------------------------------------------------------------------------------
# Configuration: one fastcog Config for the fastcog path; the reference and ablation rows derive
# from it by switching the fast-path switches off.
# --------------------------------------------------------------------------------------------


def checkpoint_transformer_dir(path: Path) -> Path:
    return path / "transformer" if (path / "transformer").is_dir() else path


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    cfg_file = checkpoint_transformer_dir(path) / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--checkpoint: no transformer config at {cfg_file}")
    return json.loads(cfg_file.read_text())


def raw_base_config(args: argparse.Namespace, device: torch.device, variant: str) -> tuple[dict, str]:
    """The YAML sections the run starts from, and where they came from."""
    if args.config is not None:
        return yaml.safe_load(args.config.read_text()) or {}, str(args.config)
    if device.type == "cpu":
        return json.loads(json.dumps(CPU_TINY_CONFIG)), "built-in CPU setting (bench/throughput.py CPU_TINY_CONFIG)"
    recipe = REPO / "configs" / RECIPES[variant]
    raw = yaml.safe_load(recipe.read_text()) or {}
    (raw.get("model") or {}).pop("variant", None)  # a default recipe lends its settings, not its variant
    return raw, f"configs/{recipe.name}"


def resolve_variant(args: argparse.Namespace, raw: dict, ckpt_variant: str | None) -> str:
    from fastcog.variants import VARIANTS

    in_config = (raw.get("model") or {}).get("variant", "auto")
    chosen = args.variant or ckpt_variant or (in_config if in_config != "auto" else "cogvideox-5b")
    if chosen not in VARIANTS:
        raise UsageError(f"--variant {chosen!r} is not one of {', '.join(VARIANTS)}")
    for what, other in (("the checkpoint", ckpt_variant), ("the config's model.variant", in_config)):
        if other not in (None, "auto", chosen):
            raise UsageError(f"variant {chosen!r} but {what} is {other!r}: drop --variant or change one")
    return chosen


def build_config(args: argparse.Namespace, raw: dict, variant: str, small: bool) -> Config:
    """The fastcog path's config: the base sections, then the CLI options, then --set.

    small (the tiny model, or any CPU run): the resolution defaults to the tiny checkpoints' 9x64x96
    instead of the config's.
    """
    from fastcog.config import apply_overrides, config_from_dict, validate

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    model, data, train = (raw.setdefault(s, {}) for s in ("model", "data", "train"))
    if model.get("training_type", "lora") != "lora":
        raise UsageError("the benchmark measures LoRA training: set model.training_type=lora")
    model.update(variant=variant, path=str(args.checkpoint or "<random weights>"), create_tiny=None)
    data.setdefault("data_root", "<synthetic inputs>")
    default_res = TINY_RESOLUTION if small else tuple(
        data.get(key, value) for key, value in zip(("num_frames", "height", "width"), FULL_RESOLUTION))
    data["num_frames"] = args.frames or default_res[0]
    data["height"] = args.height or default_res[1]
    data["width"] = args.width or default_res[2]
    if args.batch_size:
        train["batch_size"] = args.batch_size
    if args.seed is not None:
        train["seed"] = args.seed
    if args.rank:
        raw.setdefault("lora", {})["rank"] = args.rank
    cfg = config_from_dict(apply_overrides(raw, args.overrides))
    if cfg.model.training_type != "lora":
        raise UsageError("the benchmark measures LoRA training: set model.training_type=lora")
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from fastcog.config import apply_overrides, config_from_dict, to_dict, validate

    out = config_from_dict(apply_overrides(to_dict(cfg), overrides))
    validate(out)
    return out


def reference_config(cfg: Config) -> Config:
    """Every fast-path switch off (FastConfig's defaults), full checkpointing, torch AdamW."""
    from fastcog.config import FastConfig

    defaults = FastConfig()
    switches_off = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(FastConfig)
                    if f.name not in PARAMETER_FIELDS}
    return dataclasses.replace(
        cfg,
        fast=dataclasses.replace(cfg.fast, **switches_off),
        train=dataclasses.replace(cfg.train, activation_checkpointing="full"),
        optim=dataclasses.replace(cfg.optim, name="adamw", fused=False, cpu_offload=False),
    )


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


@dataclass
class PathSpec:
    name: str
    role: str
    """reference | fastcog | ablation"""
    switches: tuple[str, ...]
    """What differs from the reference path, as section.key=value."""
    cfg: Config
    frozen_dtype: str
    """Storage dtype of the frozen base weights (the reference: fp32)."""
    steps: int


def switch_list(ref: Config, cfg: Config, frozen_dtype: str) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(label, {section: {key: value}}) for each switch `cfg` turns on relative to `ref`."""
    out: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if frozen_dtype != "fp32":
        out.append((f"frozen weights stored in {frozen_dtype}", {}))
    for f in dataclasses.fields(cfg.fast):
        value = getattr(cfg.fast, f.name)
        if f.name not in PARAMETER_FIELDS and value != getattr(ref.fast, f.name):
            out.append((f"fast.{f.name}={_yaml_value(value)}", {"fast": {f.name: value}}))
    ac = cfg.train.activation_checkpointing
    if ac != ref.train.activation_checkpointing:
        change: dict[str, dict[str, Any]] = {"train": {"activation_checkpointing": ac}}
        label = f"train.activation_checkpointing={ac}"
        if ac == "selective" and ref.fast.attention == "reference":
            # selective keeps fastcog's attention outputs: it cannot run without fastcog's processor.
            change["fast"] = {"attention": cfg.fast.attention}
            label += f" + fast.attention={cfg.fast.attention}"
        out.append((label, change))
    for key in ("name", "fused", "cpu_offload"):
        value = getattr(cfg.optim, key)
        if value != getattr(ref.optim, key):
            out.append((f"optim.{key}={_yaml_value(value)}", {"optim": {key: value}}))
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def plan_paths(cfg: Config, fast_cfg: Config, args: argparse.Namespace, steps: int) -> list[PathSpec]:
    ref = reference_config(cfg)
    fast_dtype = fast_cfg.model.dtype
    paths = [PathSpec("reference", "reference", (), ref, "fp32", steps)]
    switches = switch_list(ref, fast_cfg, fast_dtype)
    extra = [f"(fast-only) {s}" for s in args.fast_only_set]
    paths.append(PathSpec("fastcog", "fastcog", tuple([s for s, _ in switches] + extra), fast_cfg, fast_dtype,
                          steps))
    if args.ablation:
        for label, change in switches:
            row_cfg = ref
            for section, values in change.items():
                row_cfg = dataclasses.replace(row_cfg, **{
                    section: dataclasses.replace(getattr(row_cfg, section), **values)})
            dtype = fast_dtype if not change else "fp32"  # the storage row is the one with no config change
            paths.append(PathSpec(f"+ {label}", "ablation", (label,), row_cfg, dtype,
                                  args.ablation_steps or steps))
    return paths


# --------------------------------------------------------------------------------------------
# Shared inputs: architecture, scheduler, VAE, batches
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything every path shares."""

    device: torch.device
    variant: VariantSpec
    transformer_config: dict[str, Any]
    arch_source: str
    checkpoint: Path | None
    tiny: bool
    dtype: str
    seed: int
    warmup: int
    total_steps: int
    """Warm-up + the longest path's timed steps: the LR schedule's length in every path."""
    latent_shape: tuple[int, ...]
    """Per sample, [C, F, H, W]."""
    video_tokens: int
    text_tokens: int
    flops_per_sample: float
    peak_flops: float | None
    scheduler: Any
    vae: Any
    batches: list[dict[str, torch.Tensor]]
    lora_b_init: str
    init_lora: dict[str, torch.Tensor] | None = None
    ref_final_lora: dict[str, torch.Tensor] | None = None


def transformer_arch(args: argparse.Namespace, cfg: Config, variant: str, tiny: bool) -> tuple[dict, str]:
    from fastcog.models import tiny_transformer_config
    from fastcog.variants import FULL_TRANSFORMER_CONFIGS

    d = cfg.data
    if args.checkpoint is not None:
        return read_checkpoint_config(args.checkpoint), f"checkpoint {args.checkpoint}"
    if tiny:
        return tiny_transformer_config(variant, d.height, d.width, d.num_frames), "random init, tiny architecture"
    return dict(FULL_TRANSFORMER_CONFIGS[variant]), "random init, the variant's real architecture"


def make_scheduler(variant: str, checkpoint: Path | None) -> Any:
    """The training scheduler exactly as fastcog.models.make_tiny writes it (or the checkpoint's)."""
    from diffusers import CogVideoXDPMScheduler

    from fastcog.variants import SNR_SHIFT_SCALE

    if checkpoint is not None and (checkpoint / "scheduler").is_dir():
        return CogVideoXDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    return CogVideoXDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=SNR_SHIFT_SCALE.get(variant, 1.0), timestep_spacing="trailing",
    )


def make_vae(variant: VariantSpec, cfg: Config, checkpoint: Path | None, tiny: bool, device: torch.device,
             seed: int) -> Any:
    """I2V encodes the conditioning image every step, so its VAE is part of the step: the checkpoint's,
    else random weights of the real architecture (tiny: make_tiny's), in the compute dtype."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from fastcog.models import TORCH_DTYPES
    from fastcog.variants import INVERT_SCALE_LATENTS, VAE_SCALING

    dtype = TORCH_DTYPES[cfg.model.dtype]
    if checkpoint is not None and (checkpoint / "vae").is_dir():
        vae = AutoencoderKLCogVideoX.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype)
    else:
        torch.manual_seed(seed + 2)
        scale = dict(scaling_factor=VAE_SCALING.get(variant.name, 0.7),
                     invert_scale_latents=variant.name in INVERT_SCALE_LATENTS)
        if tiny:
            vae = AutoencoderKLCogVideoX(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                         latent_channels=16, sample_height=cfg.data.height,
                                         sample_width=cfg.data.width, **scale)
        else:
            vae = AutoencoderKLCogVideoX(sample_height=cfg.data.height, sample_width=cfg.data.width, **scale)
    return quiet_to(vae, device=device, dtype=dtype).requires_grad_(False).eval()


def make_batches(n: int, batch: int, latent_shape: tuple[int, ...], text_shape: tuple[int, int],
                 pixels: tuple[int, int], is_i2v: bool, dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor]]:
    """n random batches on the host (scaled latents and T5 embeddings are about unit variance)."""
    import torch

    g = torch.Generator().manual_seed(seed + 3)
    out = []
    for _ in range(n):
        b = {"latents": torch.randn(batch, *latent_shape, generator=g).to(dtype),
             "prompt_embeds": torch.randn(batch, *text_shape, generator=g).to(dtype)}
        if is_i2v:
            b["images"] = (torch.rand(batch, 3, *pixels, generator=g) * 2 - 1).to(dtype)
        out.append(b)
    return out


def setup_bench(args: argparse.Namespace, cfg: Config, variant_name: str, tiny: bool, device: torch.device,
                paths: list[PathSpec], warmup: int) -> Bench:
    from fastcog.config import validate_for_variant
    from fastcog.metrics import peak_flops, transformer_flops_per_sample
    from fastcog.models import TORCH_DTYPES
    from fastcog.trainer import video_tokens
    from fastcog.variants import detect_variant

    tcfg, source = transformer_arch(args, cfg, variant_name, tiny)
    variant = detect_variant(tcfg)
    validate_for_variant(cfg, variant)
    d = cfg.data
    temporal = variant.temporal_compression_ratio
    latent_shape = (variant.latent_channels, (d.num_frames - 1) // temporal + 1, d.height // 8, d.width // 8)
    tokens = video_tokens(latent_shape, variant)
    text_shape = (variant.max_text_seq_length, variant.text_embed_dim)
    total = warmup + max(p.steps for p in paths)
    return Bench(
        device=device, variant=variant, transformer_config=tcfg, arch_source=source, checkpoint=args.checkpoint,
        tiny=tiny, dtype=cfg.model.dtype, seed=cfg.train.seed, warmup=warmup, total_steps=total,
        latent_shape=latent_shape, video_tokens=tokens, text_tokens=variant.max_text_seq_length,
        flops_per_sample=transformer_flops_per_sample(tcfg, tokens, cfg.lora.rank, cfg.lora.target_modules, False),
        peak_flops=peak_flops(device), scheduler=make_scheduler(variant.name, args.checkpoint),
        vae=make_vae(variant, cfg, args.checkpoint, tiny, device, cfg.train.seed) if variant.is_i2v else None,
        batches=make_batches(total, cfg.train.batch_size, latent_shape, text_shape, (d.height, d.width),
                             variant.is_i2v, TORCH_DTYPES[cfg.model.dtype], cfg.train.seed),
        lora_b_init=args.lora_b_init,
    )


# --------------------------------------------------------------------------------------------
# Building and running one path
# --------------------------------------------------------------------------------------------


@dataclass
class PathResult:
    spec: PathSpec
    status: str = "not run"
    error_trace: str | None = None
    build_s: float | None = None
    warmup_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    peak_allocated_gb: float | None = None
    peak_reserved_gb: float | None = None
    patch_report: dict[str, Any] = field(default_factory=dict)
    final_lora: dict[str, torch.Tensor] | None = None
    lora_divergence: dict[str, float | None] | None = None
    """Final adapters against the reference's (see lora_divergence); set once both have run."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def make_transformer(bench: Bench, dtype: str) -> torch.nn.Module:
    """The same base weights for every path: one seeded initialisation on the device, in fp32, cast
    to the path's storage dtype (what loading an fp32 checkpoint with that torch_dtype gives)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from fastcog.models import TORCH_DTYPES

    if bench.checkpoint is not None:
        sub = {"subfolder": "transformer"} if (bench.checkpoint / "transformer").is_dir() else {}
        model = CogVideoXTransformer3DModel.from_pretrained(bench.checkpoint, torch_dtype=TORCH_DTYPES[dtype], **sub)
        return model.to(bench.device)
    torch.manual_seed(bench.seed)
    with torch.device(bench.device):  # initialise where it runs: a 5B init on the host takes minutes
        model = CogVideoXTransformer3DModel(**bench.transformer_config)
    return quiet_to(model, dtype=TORCH_DTYPES[dtype])


def quiet_to(module: Any, **kwargs: Any) -> Any:
    """module.to(...) without diffusers' "keep modules in float32" advice, which is about
    from_pretrained and warns even when the model has no such module."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(**kwargs)
    finally:
        diffusers_logging.set_verbosity(level)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def randomize_lora_b(model: torch.nn.Module, rank: int, alpha: float, seed: int) -> None:
    """B ~ N(0, s^2), seeded on the host so every device draws the same values (see LORA_B_INIT_RATIO)."""
    import torch

    std = LORA_B_INIT_RATIO / ((alpha / rank) * math.sqrt(rank))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_path(spec: PathSpec, bench: Bench) -> tuple[Any, ...]:
    """(model, params, objective, optimizer, lr_scheduler, grad_scaler, patch report) for one path."""
    import torch

    from fastcog.lora import inject_lora, load_trainable_state_dict

    cfg = spec.cfg
    model = make_transformer(bench, spec.frozen_dtype)
    params = inject_lora(model, cfg.lora)
    if bench.init_lora is None:  # the first path (the reference) fixes the adapters' start
        if bench.lora_b_init == "random":
            randomize_lora_b(model, cfg.lora.rank, cfg.lora.alpha, bench.seed)
        bench.init_lora = lora_state(model)
    load_trainable_state_dict(model, bench.init_lora)
    model.to(bench.device).train()
    if spec.role == "reference":
        objective, optimizer, lr_scheduler, report = build_reference(model, params, cfg, bench)
    else:
        objective, optimizer, lr_scheduler, report = build_fastcog(model, params, cfg, bench)
    scaler = torch.amp.GradScaler(bench.device.type) if cfg.model.dtype == "fp16" else None
    return model, params, objective, optimizer, lr_scheduler, scaler, report


def build_reference(model: Any, params: list, cfg: Config, bench: Bench) -> tuple[Any, Any, Any, dict]:
    """The reference trainer's setup, written out here so no fastcog fast-path code is involved."""
    import torch
    from diffusers.optimization import get_scheduler

    from fastcog.objective import ReferenceObjective

    model.enable_gradient_checkpointing()
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, step_rules=o.lr_step_rules,
                                 num_warmup_steps=o.lr_warmup_steps, num_training_steps=bench.total_steps,
                                 num_cycles=o.lr_num_cycles, power=o.lr_power)
    objective = ReferenceObjective(bench.variant, bench.scheduler, bench.vae, cfg.model.i2v_image_scale)
    processors = {type(p).__name__ for p in model.attn_processors.values()}
    report = {"attention_backend": f"diffusers {', '.join(sorted(processors))} (SDPA, torch's choice)",
              "activation_checkpointing": "full (diffusers enable_gradient_checkpointing, every block)",
              "frozen_weights": f"fp32 under {cfg.model.dtype} autocast", "optimizer": "torch.optim.AdamW",
              "objective": "fastcog.objective.ReferenceObjective"}
    return objective, optimizer, lr_scheduler, report


def build_fastcog(model: Any, params: list, cfg: Config, bench: Bench) -> tuple[Any, Any, Any, dict]:
    from fastcog.fast import apply_fast_path
    from fastcog.objective import make_objective
    from fastcog.optim import build_optimizer

    fast_report = apply_fast_path(model, cfg, bench.device, tokens_per_sample=bench.video_tokens, verbose=False)
    objective = make_objective(cfg, bench.variant, bench.scheduler, bench.vae)
    optimizer, lr_scheduler = build_optimizer(cfg, params, bench.total_steps)
    report = dataclasses.asdict(fast_report) if dataclasses.is_dataclass(fast_report) else {"report": str(fast_report)}
    for key, value in list(report.items()):  # lists of module names: the count is what a reader needs
        if key != "lines" and isinstance(value, list):
            report[key] = len(value)
    report.update(objective=type(objective).__name__, optimizer=type(optimizer).__name__)
    return objective, optimizer, lr_scheduler, report


def train_step(model: Any, params: list, objective: Any, optimizer: Any, lr_scheduler: Any, scaler: Any,
               batch: dict, cfg: Config, device: torch.device) -> tuple[float, float]:
    """The one step every path runs: forward (autocast), backward, clip, optimizer, LR, zero_grad."""
    import torch

    from fastcog.trainer import autocast

    with autocast(device, cfg.model.dtype):
        loss = objective(model, batch)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), float(grad_norm)


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_path(spec: PathSpec, bench: Bench, res: PathResult) -> None:
    import torch

    t0 = time.perf_counter()
    model, params, objective, optimizer, lr_scheduler, scaler, res.patch_report = build_path(spec, bench)
    res.build_s = time.perf_counter() - t0
    for line in res.patch_report.get("lines", []):
        print(f"[{spec.name}] {line}", file=sys.stderr, flush=True)
    if bench.device.type == "cuda":  # the training peak, resident weights included; build transients not
        sync(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
    for k in range(bench.warmup + spec.steps):
        batch = {name: t.to(bench.device) for name, t in bench.batches[k].items()}
        torch.manual_seed(bench.seed + k)  # the same timesteps and noise at step k in every path
        res.lrs.append(float(lr_scheduler.get_last_lr()[0]))
        sync(bench.device)
        start = time.perf_counter()
        loss, grad_norm = train_step(model, params, objective, optimizer, lr_scheduler, scaler, batch, spec.cfg,
                                     bench.device)
        sync(bench.device)
        (res.warmup_times if k < bench.warmup else res.step_times).append(time.perf_counter() - start)
        res.losses.append(loss)
        res.grad_norms.append(grad_norm)
    if bench.device.type == "cuda":
        res.peak_allocated_gb = torch.cuda.max_memory_allocated(bench.device) / 1e9
        res.peak_reserved_gb = torch.cuda.max_memory_reserved(bench.device) / 1e9
    res.final_lora = lora_state(model)
    res.status = "ok"


def run_path(spec: PathSpec, bench: Bench) -> PathResult:
    """Run one path; an exception becomes the row's status, so one broken switch still leaves a table."""
    res = PathResult(spec)
    print(f"[{spec.name}] building and running {bench.warmup} warm-up + {spec.steps} steps", file=sys.stderr,
          flush=True)
    try:
        _run_path(spec, bench, res)
    except Exception as err:  # noqa: BLE001 - recorded in the results, the run goes on
        first = (str(err).strip().splitlines() or [""])[0]
        res.status = f"failed: {type(err).__name__}: {first}"[:400]
        res.error_trace = traceback.format_exc()[-4000:]
        print(f"[{spec.name}] {res.status}", file=sys.stderr, flush=True)
    release_memory(bench.device)
    return res


def release_memory(device: torch.device) -> None:
    """Free the previous path's model, optimizer state and compiled graphs before the next path."""
    import torch

    gc.collect()
    try:
        torch._dynamo.reset()  # compiled code holds references to the compiled modules
    except Exception:  # noqa: BLE001 - nothing was compiled, or dynamo is unavailable
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Metrics, parity, targets
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def path_metrics(res: PathResult, bench: Bench, ref: PathResult | None) -> dict[str, Any]:
    times = res.step_times
    if not res.ok or not times:
        return {}
    p10, p50, p90 = (percentile(times, q) for q in (10, 50, 90))
    batch = res.spec.cfg.train.batch_size
    tflops = bench.flops_per_sample * batch / p50 / 1e12
    warm = sum(res.warmup_times)
    cpu = bench.device.type != "cuda"
    return {
        "step_time_s": {"p10": p10, "p50": p50, "p90": p90, "mean": sum(times) / len(times), "all": times},
        "warmup_step_times_s": res.warmup_times,
        "compile_warmup_s": max(0.0, warm - len(res.warmup_times) * p50) if res.warmup_times else None,
        "build_s": res.build_s,
        "samples_per_s": batch / p50,
        "video_tokens_per_s": batch * bench.video_tokens / p50,
        "model_tflops_per_s": tflops,
        "mfu": None if bench.peak_flops is None else tflops * 1e12 / bench.peak_flops,
        "peak_memory_allocated_gb": res.peak_allocated_gb,
        "peak_memory_reserved_gb": res.peak_reserved_gb,
        "memory_note": "not measured on CPU" if cpu else "torch.cuda max allocated / reserved over the steps",
        "speedup_vs_reference": percentile(ref.step_times, 50) / p50 if ref and ref.ok and ref.step_times else None,
    }


def parity_rtol(res: PathResult, override: float | None) -> float:
    """The documented tolerance for the path's precision; FP8's only where linears were converted (a
    tiny model has none above fast.fp8_min_features)."""
    if override is not None:
        return override
    fp8 = res.patch_report.get("fp8_linears")
    if fp8 is None:  # not reported: go by the config
        fp8 = res.spec.cfg.fast.fp8 != "none" or res.spec.cfg.fast.fp8_weight_storage
    return FP8_PARITY_RTOL if fp8 else PARITY_RTOL[res.spec.cfg.model.dtype]


def series_parity(ref: list[float], values: list[float], rtol: float) -> dict[str, Any]:
    """Per-step |x - x_ref| and |x - x_ref| / |x_ref| over the steps both ran; passes iff every step is
    finite and within rtol."""
    rows = []
    for k, (a, b) in enumerate(zip(ref, values), start=1):
        diff = abs(b - a)
        rel = diff / abs(a) if a != 0 else (0.0 if diff == 0 else math.inf)
        ok = math.isfinite(a) and math.isfinite(b) and rel <= rtol
        rows.append({"step": k, "reference": a, "path": b, "abs_diff": diff, "rel_diff": rel, "pass": ok})
    return {
        "max_abs_diff": max((r["abs_diff"] for r in rows), default=None),
        "max_rel_diff": max((r["rel_diff"] for r in rows), default=None),
        "pass": bool(rows) and all(r["pass"] for r in rows),
        "per_step": rows,
    }


def parity(ref: PathResult, res: PathResult, rtol: float) -> dict[str, Any]:
    """Loss and pre-clip gradient norm, step by step, against the reference.

    PASS iff both are within rtol at every step and the path ran to the end (one that stopped
    early or went NaN fails); ablation rows may run fewer steps and compare those. The gradient
    norm is in the verdict because at random init the loss hardly depends on the transformer's
    output (it is dominated by the target's variance): doubling the LoRA scale on the tiny model
    moved the step-1 loss by 1.6e-5 relative and the gradient norm by 100%.
    """
    loss = series_parity(ref.losses, res.losses, rtol)
    grad = series_parity(ref.grad_norms, res.grad_norms, rtol)
    ok = loss["pass"] and grad["pass"] and res.ok
    first = None
    if loss["per_step"]:
        first = {"loss": loss["per_step"][0], "grad_norm": grad["per_step"][0] if grad["per_step"] else None}
    return {
        "rtol": rtol,
        "steps_compared": len(loss["per_step"]),
        "first_step_identical_weights": first,
        "loss": loss,
        "grad_norm": grad,
        "max_rel_diff": max(loss["max_rel_diff"] or 0.0, grad["max_rel_diff"] or 0.0),
        "verdict": "PASS" if ok else "FAIL",
        "final_lora_weights": res.lora_divergence,
    }


def lora_divergence(init: dict, ref_final: dict, final: dict) -> dict[str, float | None]:
    """||W - W_ref|| and its ratio to the reference's own update ||W_ref - W_init|| (all adapters)."""
    if set(final) != set(ref_final):
        return {"abs": None, "rel_to_update": None}
    num = math.sqrt(sum(float((final[n] - ref_final[n]).double().pow(2).sum()) for n in final))
    den = math.sqrt(sum(float((ref_final[n] - init[n]).double().pow(2).sum()) for n in final))
    return {"abs": num, "rel_to_update": num / den if den > 0 else None}


def evaluate_targets(setup: dict, fast: dict, fast_parity: dict | None, ref: dict, device: torch.device,
                     tiny: bool) -> dict[str, Any]:
    """The issue's targets; judged only on a GPU at the setup they are defined for."""
    same_setup = all(setup.get(k) == v for k, v in TARGET_SETUP.items()) and not tiny
    applicable = device.type == "cuda" and same_setup
    reason = None if applicable else ("CPU run" if device.type != "cuda" else
                                      f"targets are defined for {TARGET_SETUP} on an H100 / H200")

    def judged(value: Any, ok: bool | None) -> dict[str, Any]:
        return {"value": value, "met": (ok if applicable else None)}

    speedup, mfu = fast.get("speedup_vs_reference"), fast.get("mfu")
    mem, ref_mem = fast.get("peak_memory_allocated_gb"), ref.get("peak_memory_allocated_gb")
    return {
        "applicable": applicable,
        "not_applicable_because": reason,
        "speedup_min_2.5": judged(speedup, speedup is not None and speedup >= TARGETS["speedup_min"]),
        "mfu_min_0.60": judged(mfu, mfu is not None and mfu >= TARGETS["mfu_min"]),
        "peak_memory_le_reference": judged(
            None if mem is None else {"fastcog_gb": mem, "reference_gb": ref_mem},
            mem is not None and ref_mem is not None and mem <= ref_mem),
        "loss_parity": judged(None if fast_parity is None else fast_parity["verdict"],
                              fast_parity is not None and fast_parity["verdict"] == "PASS"),
    }


# --------------------------------------------------------------------------------------------
# Environment: hardware, versions, commit
# --------------------------------------------------------------------------------------------


def hardware(device: torch.device) -> dict[str, Any]:
    """Model names only: nothing that identifies the machine."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "name": props.name, "count": torch.cuda.device_count(),
                "memory_gb": props.total_memory / 1e9, "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count}
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "name": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    from importlib import metadata

    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "diffusers", "peft", "transformers", "torchao", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def git_info() -> dict[str, Any]:
    """The commit and whether tracked files differ from it; a copy without .git (the GPU machine)
    can pass them in FASTCOG_GIT_COMMIT / FASTCOG_GIT_DIRTY."""

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(status), "source": "git"}
    env_dirty = os.environ.get("FASTCOG_GIT_DIRTY")
    return {"commit": os.environ.get("FASTCOG_GIT_COMMIT"),
            "dirty": None if env_dirty is None else env_dirty.lower() in ("1", "true", "yes"),
            "source": "environment (no git checkout)" if os.environ.get("FASTCOG_GIT_COMMIT") else "unknown"}


# --------------------------------------------------------------------------------------------
# Report: JSON, markdown, PNG
# --------------------------------------------------------------------------------------------


def build_report(args: argparse.Namespace, argv: list[str], bench: Bench, results: list[PathResult],
                 base_source: str, started: str, env: dict[str, Any], complete: bool) -> dict[str, Any]:
    from fastcog.config import to_dict

    ref = results[0] if results and results[0].spec.role == "reference" else None
    setup = {
        "variant": bench.variant.name, "architecture": bench.arch_source, "tiny": bench.tiny,
        "checkpoint": None if bench.checkpoint is None else str(bench.checkpoint),
        "frames": results[0].spec.cfg.data.num_frames if results else None,
        "height": results[0].spec.cfg.data.height if results else None,
        "width": results[0].spec.cfg.data.width if results else None,
        "batch_size": results[0].spec.cfg.train.batch_size if results else None,
        "lora_rank": results[0].spec.cfg.lora.rank if results else None,
        "lora_alpha": results[0].spec.cfg.lora.alpha if results else None,
        "lora_targets": list(results[0].spec.cfg.lora.target_modules) if results else None,
        "lora_b_init": bench.lora_b_init, "dtype": bench.dtype, "seed": bench.seed,
        "warmup_steps": bench.warmup, "timed_steps": max((r.spec.steps for r in results), default=0),
        "gradient_accumulation": "1 micro-batch per optimizer step (accumulation only repeats forward+backward)",
        "latent_shape_per_sample": list(bench.latent_shape), "video_tokens_per_sample": bench.video_tokens,
        "text_tokens_per_sample": bench.text_tokens, "model_flops_per_sample": bench.flops_per_sample,
        "flop_convention": "DESIGN.md: model FLOPs of forward + backward, recompute not counted",
        "peak_flops_per_s": bench.peak_flops,
        "inputs": "random latents, prompt embeddings (and I2V images) from a seeded host generator; batch k and "
                  "torch.manual_seed(seed + k) at step k in every path",
        "transformer_config": bench.transformer_config,
        "base_config": base_source, "overrides": list(args.overrides),
        "fast_only_overrides": list(args.fast_only_set),
    }
    paths = []
    fast_parity = None
    fast_metrics: dict[str, Any] = {}
    for res in results:
        metrics = path_metrics(res, bench, ref)
        entry: dict[str, Any] = {
            "name": res.spec.name, "role": res.spec.role, "switches": list(res.spec.switches),
            "status": res.status, "frozen_weights_dtype": res.spec.frozen_dtype, "config": to_dict(res.spec.cfg),
            "patches": res.patch_report, "metrics": metrics, "losses": res.losses, "grad_norms": res.grad_norms,
            "lrs": res.lrs,
        }
        if res.error_trace:
            entry["error_trace"] = res.error_trace
        if ref is not None and ref.ok and res is not ref and res.losses:
            entry["parity"] = parity(ref, res, parity_rtol(res, args.parity_rtol))
        if res.spec.role == "fastcog":
            fast_parity, fast_metrics = entry.get("parity"), metrics
        paths.append(entry)
    ref_metrics = paths[0]["metrics"] if paths else {}
    return {
        "schema": "fastcog.bench.throughput/1",
        "complete": complete,
        "date": started,
        "cpu_run": bench.device.type != "cuda",
        "note": CPU_NOTE if bench.device.type != "cuda" else None,
        "command": ["python", "bench/throughput.py", *argv],
        "hardware": env["hardware"],
        "versions": env["versions"],
        "git": env["git"],
        "host_peak_rss_gb_whole_process": env.get("host_peak_rss_gb"),
        "setup": setup,
        "parity_tolerance": {
            "rule": "every step: |L - L_ref| / |L_ref| <= rtol (bench/throughput.py docstring has the reasoning)",
            "rtol_by_dtype": PARITY_RTOL, "rtol_fp8": FP8_PARITY_RTOL, "override": args.parity_rtol,
        },
        "paths": paths,
        "speedup": fast_metrics.get("speedup_vs_reference"),
        "parity": fast_parity,
        "targets": evaluate_targets(setup, fast_metrics, fast_parity, ref_metrics, bench.device, bench.tiny),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN / Infinity: non-finite numbers become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    s, hw, v, git = report["setup"], report["hardware"], report["versions"], report["git"]
    cpu = report["cpu_run"]
    title = (f"# fastcog throughput: {s['variant']}{' (tiny architecture)' if s['tiny'] else ''}, "
             f"{s['frames']}x{s['height']}x{s['width']}, batch {s['batch_size']}, LoRA r={s['lora_rank']}, "
             f"{s['dtype']}")
    lines = [title, ""]
    if cpu:
        lines += [f"**{CPU_NOTE}**", ""]
    commit = git.get("commit") or "unknown"
    lines += [
        f"- hardware: {hw['name']} ({hw['device']}); torch {v['torch']}, triton {v['triton']}, diffusers "
        f"{v['diffusers']}, peft {v['peft']}; commit {commit[:12]}{' (dirty)' if git.get('dirty') else ''}",
        f"- model: {s['architecture']}; {s['video_tokens_per_sample']} video + {s['text_tokens_per_sample']} text "
        f"tokens per sample; {s['model_flops_per_sample']:.4g} model FLOPs per sample ({s['flop_convention']})",
        f"- {s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per path; same inputs, seeds, timesteps "
        f"and noise in every path; config: {s['base_config']}"
        + (f" + --set {' '.join(s['overrides'])}" if s["overrides"] else ""),
    ]
    if s["fast_only_overrides"]:
        lines.append(f"- **fastcog path only: {' '.join(s['fast_only_overrides'])}: not a like-for-like comparison**")
    lines += ["", "| path | switches on | status | p50 s | p10 s | p90 s | samples/s | video tok/s | TFLOP/s | MFU "
              "| peak alloc GB | peak rsvd GB | warm-up s | speedup | parity (max rel diff) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    mem_none = "n/m (CPU)" if cpu else "-"
    for p in report["paths"]:
        m = p["metrics"]
        st = m.get("step_time_s", {})
        par = p.get("parity")
        par_s = "reference" if p["role"] == "reference" else (
            f"{par['verdict']} ({_fmt(par['max_rel_diff'], '.2e')})" if par else "-")
        status = p["status"] if len(p["status"]) <= 120 else p["status"][:117] + "..."  # in full in the JSON
        lines.append(
            f"| {p['name']} | {', '.join(p['switches']) or '-'} | {status} | {_fmt(st.get('p50'), '.4f')} | "
            f"{_fmt(st.get('p10'), '.4f')} | {_fmt(st.get('p90'), '.4f')} | {_fmt(m.get('samples_per_s'))} | "
            f"{_fmt(m.get('video_tokens_per_s'), '.4g')} | {_fmt(m.get('model_tflops_per_s'))} | "
            f"{_fmt(m.get('mfu'), '.1%', 'n/a' if cpu else '-')} | "
            f"{_fmt(m.get('peak_memory_allocated_gb'), '.2f', mem_none)} | "
            f"{_fmt(m.get('peak_memory_reserved_gb'), '.2f', mem_none)} | {_fmt(m.get('compile_warmup_s'), '.2f')} | "
            f"{_fmt(m.get('speedup_vs_reference'), '.2f')}{'x' if m.get('speedup_vs_reference') else ''} | {par_s} |")
    lines += ["", "p10 / p50 / p90 over the timed steps, device-synchronised; throughput from p50; warm-up s = the "
              "warm-up steps' time minus as many p50 steps (compile, autotune); speedup = reference p50 / path p50."]
    par = report["parity"]
    if par:
        lines += ["", f"Parity, fastcog vs reference: loss and pre-clip gradient norm, every step within rtol "
                  f"{par['rtol']:.0e} (step 1: identical weights and inputs):", "",
                  "| step | loss ref | loss fastcog | rel diff | grad norm ref | grad norm fastcog | rel diff | ok |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lo, gr in zip(par["loss"]["per_step"], par["grad_norm"]["per_step"]):
            lines.append(f"| {lo['step']} | {_fmt(lo['reference'], '.6f')} | {_fmt(lo['path'], '.6f')} | "
                         f"{_fmt(lo['rel_diff'], '.2e')} | {_fmt(gr['reference'], '.6g')} | "
                         f"{_fmt(gr['path'], '.6g')} | "
                         f"{_fmt(gr['rel_diff'], '.2e')} | {'yes' if lo['pass'] and gr['pass'] else 'NO'} |")
        w = par.get("final_lora_weights") or {}
        lines += ["", f"**Parity: {par['verdict']}** (max rel diff: loss {_fmt(par['loss']['max_rel_diff'], '.2e')}, "
                  f"grad norm {_fmt(par['grad_norm']['max_rel_diff'], '.2e')}, over {par['steps_compared']} steps; "
                  f"final LoRA weights ||W - W_ref|| / ||W_ref - W_init|| = {_fmt(w.get('rel_to_update'), '.3g')}, "
                  "reported only)"]
    else:
        lines += ["", "**Parity: not computed** (a path failed)"]
    lines.append(f"**Speedup (reference p50 / fastcog p50): {_fmt(report['speedup'], '.2f')}"
                 f"{'x' if report['speedup'] else ''}**" + (" (CPU: not a performance claim)" if cpu else ""))
    t = report["targets"]
    if t["applicable"]:
        lines.append("Targets: " + "; ".join(
            f"{k}: {'met' if t[k]['met'] else 'NOT met'}" for k in ("speedup_min_2.5", "mfu_min_0.60",
                                                                    "peak_memory_le_reference", "loss_parity")))
    else:
        lines.append(f"Targets not judged: {t['not_applicable_because']}")
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Left: the loss per step of every path; middle: the fastcog path's per-step relative difference
    from the reference (loss and gradient norm) against the tolerance; right: each path's p50 step
    time (p10-p90 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = report["paths"]
    fig, (ax_loss, ax_diff, ax_time) = plt.subplots(1, 3, figsize=(19, 5.5))
    warm = report["setup"]["warmup_steps"]
    for p in paths:
        if not p["losses"]:
            continue
        main = p["role"] != "ablation"
        steps = list(range(1, len(p["losses"]) + 1))
        losses = [x if isinstance(x, float) and math.isfinite(x) else float("nan") for x in p["losses"]]
        ax_loss.plot(steps, losses, label=p["name"], linewidth=2.2 if main else 1.0,
                     linestyle={"reference": "-", "fastcog": "--"}.get(p["role"], ":"),
                     marker="o" if main else None, alpha=1.0 if main else 0.7)
    if warm:
        ax_loss.axvspan(0.5, warm + 0.5, color="0.9", label="warm-up steps")
    ax_loss.set_xlabel("step (same seeds and inputs in every path)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss per step")
    ax_loss.legend(fontsize=7)

    par = report["parity"]
    if par:
        floor = 1e-12  # exact agreement, drawn on the log axis
        for series, marker in (("loss", "o"), ("grad_norm", "s")):
            rows = par[series]["per_step"]
            rel = [r["rel_diff"] if isinstance(r["rel_diff"], float) and math.isfinite(r["rel_diff"]) else 1.0
                   for r in rows]
            ax_diff.semilogy([r["step"] for r in rows], [max(v, floor) for v in rel], marker=marker,
                             label=f"{series.replace('_', ' ')}: |d| / |ref|")
        ax_diff.axhline(par["rtol"], color="tab:red", linestyle="--", label=f"tolerance {par['rtol']:.0e}")
        ax_diff.set_title(f"fastcog vs reference: parity {par['verdict']}")
        ax_diff.legend(fontsize=7)
    else:
        ax_diff.text(0.5, 0.5, "parity not computed (a path failed)", ha="center", transform=ax_diff.transAxes)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel(f"relative difference (exact = {1e-12:.0e})")

    names = [p["name"] for p in paths]
    p50 = [p["metrics"].get("step_time_s", {}).get("p50", 0.0) for p in paths]
    lo = [max(0.0, v - p["metrics"].get("step_time_s", {}).get("p10", v)) for v, p in zip(p50, paths)]
    hi = [max(0.0, p["metrics"].get("step_time_s", {}).get("p90", v) - v) for v, p in zip(p50, paths)]
    colors = ["tab:gray" if p["role"] == "reference" else "tab:green" if p["role"] == "fastcog" else "tab:blue"
              for p in paths]
    ys = range(len(paths))
    ax_time.barh(ys, p50, xerr=[lo, hi], color=colors)
    for y, p in zip(ys, paths):
        if p["status"] != "ok":
            ax_time.text(0, y, f"  {p['status'][:60]}", va="center", fontsize=7, color="tab:red")
    ax_time.set_yticks(list(ys), names, fontsize=7)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("step time p50, s (bars: p10-p90)")
    ax_time.set_title("step time per path")
    s = report["setup"]
    title = (f"{s['variant']}{' tiny' if s['tiny'] else ''} {s['frames']}x{s['height']}x{s['width']} "
             f"b{s['batch_size']} r{s['lora_rank']} {s['dtype']} on {report['hardware']['name']}")
    if report["cpu_run"]:
        title += "\nCPU run: not a performance claim"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_stem(bench: Bench, cfg: Config, hw: dict[str, Any], started: str) -> str:
    d = cfg.data
    device = "cpu" if hw["device"] == "cpu" else "".join(c if c.isalnum() else "-" for c in hw["name"].lower())
    variant = bench.variant.name + ("-tiny" if bench.tiny else "")
    stamp = started.replace("-", "").replace(":", "")[:15]  # 20261124T220100
    return f"throughput_{variant}_{d.num_frames}x{d.height}x{d.width}_{device}_{stamp}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def prepare(args: argparse.Namespace) -> tuple[torch.device, Config, Config, str, str, bool]:
    """Device, the fastcog config, the fastcog path's config (with --fast-only-set), variant, source, tiny."""
    from fastcog.errors import ConfigError

    device = pick_device(args.device)
    tiny = args.tiny or (device.type == "cpu" and args.checkpoint is None)
    if device.type == "cpu" and not args.tiny:
        print("CPU: the tiny benchmark (--tiny is the CPU default)" if tiny else "CPU: running the checkpoint on the "
              "CPU at 9x64x96 unless --frames / --height / --width say otherwise", file=sys.stderr)
    ckpt_variant = None
    if args.checkpoint is not None:
        from fastcog.variants import detect_variant

        ckpt_variant = detect_variant(read_checkpoint_config(args.checkpoint)).name
    # Without --config the variant picks the base (its recipe); with one, the config may name it.
    raw, source = raw_base_config(args, device, args.variant or ckpt_variant or "cogvideox-5b")
    variant = resolve_variant(args, raw, ckpt_variant)
    try:
        cfg = build_config(args, raw, variant, small=tiny or device.type == "cpu")
        fast_cfg = with_overrides(cfg, args.fast_only_set) if args.fast_only_set else cfg
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return device, cfg, fast_cfg, variant, source, tiny


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
        from fastcog.errors import FastcogError

        try:
            bench = setup_bench(args, cfg, variant, tiny, device, paths, warmup)
        except FastcogError as err:
            raise UsageError(str(err)) from None
    except UsageError as err:
        print(f"bench/throughput.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return run_benchmark(args, argv, bench, cfg, paths, source)


def run_benchmark(args: argparse.Namespace, argv: list[str], bench: Bench, cfg: Config, paths: list[PathSpec],
                  source: str) -> int:
    from fastcog.metrics import host_peak_rss_gb

    t_start = time.monotonic()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"hardware": hardware(bench.device), "versions": versions(), "git": git_info()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(bench, cfg, env["hardware"], started)
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    if bench.device.type == "cpu":
        print(CPU_NOTE, file=sys.stderr)

    results: list[PathResult] = []
    for spec in paths:
        over_budget = args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds
        if spec.role == "ablation" and over_budget:
            res = PathResult(spec, status=f"skipped: --max-seconds {args.max_seconds:g} reached")
        elif spec.role != "reference" and results and not results[0].ok:
            res = PathResult(spec, status="skipped: the reference path failed")
        else:
            res = run_path(spec, bench)
        if spec.role == "reference" and res.ok:
            bench.ref_final_lora = res.final_lora
        elif res.final_lora is not None and bench.ref_final_lora is not None and bench.init_lora is not None:
            res.lora_divergence = lora_divergence(bench.init_lora, bench.ref_final_lora, res.final_lora)
            res.final_lora = None  # compared: give the host memory back
        results.append(res)
        env["host_peak_rss_gb"] = host_peak_rss_gb()
        report = build_report(args, argv, bench, results, source, started, env, complete=False)
        json_path.write_text(json.dumps(_clean(report), indent=1))  # partial results survive a kill

    report = build_report(args, argv, bench, results, source, started, env, complete=True)
    if not args.no_plot:
        try:
            write_plot(report, png_path)
            report["plot"] = str(png_path)
        except Exception as err:  # noqa: BLE001 - a missing plot must not lose the measurements
            report["plot"] = f"failed: {type(err).__name__}: {err}"
    json_path.write_text(json.dumps(_clean(report), indent=1))
    print(render_markdown(report))
    print(f"wrote {json_path}" + (f" and {png_path}" if report.get("plot") == str(png_path) else ""))
    return exit_status(results, report)


def exit_status(results: list[PathResult], report: dict[str, Any]) -> int:
    main_paths = [r for r in results if r.spec.role in ("reference", "fastcog")]
    if not all(r.ok for r in main_paths):
        for r in main_paths:
            if not r.ok:
                print(f"bench/throughput.py: the {r.spec.name} path did not run: {r.status}", file=sys.stderr)
        return EXIT_FAILED
    if report["parity"] is None or report["parity"]["verdict"] != "PASS":
        print("bench/throughput.py: the fastcog path FAILED parity (loss or gradient norm) with the reference",
              file=sys.stderr)
        return EXIT_PARITY
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
