"""The run's configs: the fastcog path's Config (base sections, CLI options, --set), the reference's
(every fast-path switch off), the device, and the recipes and CPU defaults they start from."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .common import REPO, UsageError

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config

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

# fastcog.config.FastConfig fields that tune a switch rather than being one: every path keeps the
# fastcog config's values, and they get no ablation row.
PARAMETER_FIELDS = {"compile_fullgraph", "fp8_min_features", "memory_margin_gb"}


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
        source = "built-in CPU setting (bench/throughput_lib/config.py CPU_TINY_CONFIG)"
        return json.loads(json.dumps(CPU_TINY_CONFIG)), source
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
# Device and configs of a run
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
