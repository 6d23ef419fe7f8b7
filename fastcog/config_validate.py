"""Checks of a built Config: allowed values from the Literal annotations, then one check per section.

`validate()` rejects combinations that cannot train and says what to change;
`validate_for_variant()` adds the rules that need the detected variant.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal

from fastcog.config_schema import SECTIONS, Config
from fastcog.errors import ConfigError
from fastcog.optimizers import OPTIMIZER_SPECS
from fastcog.variants import VAE_SPATIAL_FACTOR

# Height and width in pixels: the VAE's 8x, then the transformer's 2x2 patches.
PIXEL_MULTIPLE = 2 * VAE_SPATIAL_FACTOR


def closest(name: str, options: typing.Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the option nearest `name`, or '' when none is near."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def literal_values(tp: Any) -> tuple[Any, ...] | None:
    """The values a Literal annotation allows (also inside `X | None`); None for any other annotation."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [literal_values(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        if arms and all(arm is not None for arm in arms):
            return tuple(value for arm in arms for value in arm)  # type: ignore[union-attr]
    return None


def check_choice(value: Any, tp: Any, where: str) -> None:
    """Raise unless `value` is one a Literal annotation `tp` allows; other annotations pass."""
    allowed = literal_values(tp)
    # `1 == True`: a bool option (fast.lora_kernel's false / true) matches only a bool.
    if allowed is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
        return
    if value is None and type(None) in typing.get_args(tp):
        return
    options = list(allowed)
    if all(isinstance(o, str) for o in options) and not isinstance(value, str):
        # YAML turns some bare words into other types (`off` is False): say that it must be a string.
        raise ConfigError(f"{where}={value!r} is not one of {options}: expected a string")
    hint = closest(value, [o for o in options if isinstance(o, str)]) if isinstance(value, str) else ""
    raise ConfigError(f"{where}={value!r} is not one of {options}{hint}")


def check_choices(cfg: Config) -> None:
    """Every Literal-annotated field of every section, also for a Config built in code, not loaded."""
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        for key, tp in typing.get_type_hints(cls).items():
            check_choice(getattr(section, key), tp, f"{name}.{key}")


def _check_model(cfg: Config) -> None:
    if not cfg.model.path:
        raise ConfigError("model.path is not set: point it at a local diffusers-format CogVideoX folder")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not d.data_root:
        raise ConfigError("data.data_root is not set: point it at the folder holding the list files")
    if d.num_frames < 1 or (d.num_frames - 1) % 8 != 0:
        lower = max(1, (d.num_frames - 1) // 8 * 8 + 1)
        raise ConfigError(
            f"data.num_frames={d.num_frames} is not 8N+1: use {lower} or {lower + 8} "
            "(the VAE compresses time 4x after the first frame)"
        )
    m = PIXEL_MULTIPLE
    for key in ("height", "width"):
        value = getattr(d, key)
        if value <= 0 or value % m != 0:
            raise ConfigError(
                f"data.{key}={value} is not a positive multiple of {m} (VAE {VAE_SPATIAL_FACTOR}x times patch 2): "
                f"use {max(m, round(value / m) * m)}"
            )
    for i, (frames, height, width) in enumerate(d.buckets):
        if frames < 1 or (frames - 1) % 8 or height <= 0 or height % m or width <= 0 or width % m:
            raise ConfigError(
                f"data.buckets[{i}]={[frames, height, width]}: frames must be 8N+1 and height, width "
                f"positive multiples of {m}"
            )
    if not 0.0 <= d.max_failed_fraction <= 1.0:
        raise ConfigError(f"data.max_failed_fraction={d.max_failed_fraction}: must be between 0 and 1")
    if d.num_workers < 0 or d.synthetic_clips < 0 or d.prepare_workers < 0:
        raise ConfigError("data.num_workers, data.prepare_workers and data.synthetic_clips must be >= 0")
    _check_heldout(cfg)


def _check_heldout(cfg: Config) -> None:
    """One way of naming the held-out set, whole; the counts are checked when the data is read
    (fastcog.data.heldout)."""
    d = cfg.data
    if not 0.0 <= d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={d.validation_fraction}: must be at least 0 and below 1 "
                          "(1 would leave nothing to train on)")
    lists = (d.validation_caption_column, d.validation_video_column)
    if any(lists) and not all(lists):
        given, missing = (("validation_caption_column", "validation_video_column") if lists[0]
                          else ("validation_video_column", "validation_caption_column"))
        raise ConfigError(f"data.{given} is set but data.{missing} is not: a held-out list set needs both")
    if d.validation_image_column and not all(lists):
        raise ConfigError("data.validation_image_column is set without data.validation_caption_column and "
                          "data.validation_video_column: set both, or remove it")
    ways = [name for name, on in (("data.validation_fraction", d.validation_fraction > 0),
                                  ("data.validation_metadata_file", d.validation_metadata_file),
                                  ("data.validation_caption_column", all(lists))) if on]
    if len(ways) > 1:
        raise ConfigError(f"{' and '.join(ways)} are both set: name the held-out set one way")
    v = cfg.validation
    if v.loss_every_steps < 0:
        raise ConfigError(f"validation.loss_every_steps={v.loss_every_steps}: must be >= 0 (0 = off)")
    if v.loss_every_steps and not ways:
        raise ConfigError(f"validation.loss_every_steps={v.loss_every_steps} needs a held-out set: set "
                          "data.validation_fraction (e.g. 0.05) or data.validation_metadata_file")
    if not v.loss_quantiles or not all(0.0 <= q < 1.0 for q in v.loss_quantiles):
        raise ConfigError(f"validation.loss_quantiles={list(v.loss_quantiles)}: give at least one fraction of the "
                          "schedule, each at least 0 and below 1 (0.1 is t=100 of 1000)")


def _check_lora(cfg: Config) -> None:
    if cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank={cfg.lora.rank}: must be >= 1")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty: list the linear layers to adapt, e.g. [to_q, to_k]")


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    if o.fused and not OPTIMIZER_SPECS[o.name].fused:
        fusable = " / ".join(name for name, spec in OPTIMIZER_SPECS.items() if spec.fused)
        raise ConfigError(f"optim.fused=true applies to {fusable} only, not optim.name={o.name!r}")
    if o.fused and o.cpu_offload:
        raise ConfigError("optim.fused and optim.cpu_offload exclude each other: choose one")
    if o.cpu_offload and o.name == "prodigy":
        raise ConfigError("optim.cpu_offload runs one optimizer per tensor, which would give Prodigy a separate "
                          "step-size estimate per tensor: set optim.cpu_offload: false or choose another optim.name")
    if o.cpu_offload and cfg.model.dtype == "fp16":
        raise ConfigError("optim.cpu_offload with model.dtype=fp16: the gradient scaler cannot unscale the "
                          "offloaded gradients; use model.dtype: bf16")
    if not all(0.0 <= b < 1.0 for b in (*o.betas, o.came_betas3)):
        raise ConfigError(f"optim.betas={list(o.betas)} / optim.came_betas3={o.came_betas3}: each must be in [0, 1)")
    if min(o.eps, o.came_eps1, o.came_eps2) < 0 or o.prodigy_d_coef <= 0:
        raise ConfigError("optim.eps, optim.came_eps1 and optim.came_eps2 must be >= 0 and optim.prodigy_d_coef > 0")
    if o.lr_scheduler == "piecewise_constant" and not o.lr_step_rules:
        raise ConfigError("optim.lr_scheduler=piecewise_constant needs optim.lr_step_rules, e.g. '1:10,0.1'")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr}: must be > 0")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ConfigError("train.batch_size and train.gradient_accumulation_steps must be >= 1")
    if t.train_steps is not None and t.train_steps < 1:
        raise ConfigError(f"train.train_steps={t.train_steps}: must be >= 1 or null (use train_epochs)")
    if t.train_epochs < 1:
        raise ConfigError(f"train.train_epochs={t.train_epochs}: must be >= 1")
    if t.max_nonfinite_steps < 1:
        raise ConfigError(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 1 (1 stops at the first)")


def _check_fast(cfg: Config) -> None:
    f = cfg.fast
    if f.fp8 != "none" and f.fp8_weight_storage:
        raise ConfigError("fast.fp8 and fast.fp8_weight_storage exclude each other: FP8 matmuls already store "
                          "the frozen weights in FP8; set one of them")
    if (f.fp8 != "none" or f.fp8_weight_storage) and cfg.model.dtype == "fp32":
        raise ConfigError("fast.fp8 / fast.fp8_weight_storage need model.dtype bf16 or fp16, not fp32")
    if f.fp8_min_features < 16:
        raise ConfigError(f"fast.fp8_min_features={f.fp8_min_features}: must be >= 16 (FP8 GEMMs need "
                          "multiples of 16)")
    if f.memory_margin_gb < 0:
        raise ConfigError(f"fast.memory_margin_gb={f.memory_margin_gb}: must be >= 0")
    if cfg.train.activation_checkpointing == "selective" and f.attention == "reference":
        raise ConfigError("train.activation_checkpointing=selective keeps fastcog's attention outputs: set "
                          "fast.attention (auto, sdpa, ...) or use full / none")


def _check_parallel(cfg: Config) -> None:
    par = cfg.parallel
    if par.replicate_degree < 1:
        raise ConfigError(f"parallel.replicate_degree={par.replicate_degree}: must be >= 1")
    if par.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s={par.timeout_s}: must be > 0")


def _check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    if c.every_steps < 0 or (c.limit is not None and c.limit < 1):
        raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.limit >= 1 (or null)")


def _check_validation(cfg: Config) -> None:
    v, c = cfg.validation, cfg.checkpoint
    if not v.every_steps:
        return
    if v.every_steps < 0:
        raise ConfigError(f"validation.every_steps={v.every_steps}: must be >= 0")
    if not v.prompts:
        raise ConfigError("validation.every_steps is set but validation.prompts is empty: add prompts")
    if c.every_steps and v.every_steps % c.every_steps != 0:
        raise ConfigError(
            f"validation.every_steps={v.every_steps} is not a multiple of checkpoint.every_steps="
            f"{c.every_steps}: use {max(1, v.every_steps // c.every_steps) * c.every_steps}"
        )
    if v.images and len(v.images) != len(v.prompts):
        raise ConfigError(
            f"validation.images has {len(v.images)} entries but validation.prompts has "
            f"{len(v.prompts)}: give one image per prompt"
        )


# In section order; a check may read another section where the rule couples them.
SECTION_CHECKS = (_check_model, _check_data, _check_lora, _check_optim, _check_train, _check_fast,
                  _check_parallel, _check_checkpoint, _check_validation)


def validate(cfg: Config) -> None:
    """Reject configs that cannot train, with a message that says what to change."""
    check_choices(cfg)
    for check in SECTION_CHECKS:
        check(cfg)


def validate_for_variant(cfg: Config, variant: Any) -> None:
    """Checks that need the detected variant (a fastcog.variants.VariantSpec)."""
    if cfg.model.variant not in ("auto", variant.name):
        raise ConfigError(
            f"model.variant={cfg.model.variant!r} but {cfg.model.path} holds a {variant.name} "
            f"transformer: set model.variant to {variant.name!r} or auto"
        )
    if variant.is_i2v and cfg.validation.every_steps and not cfg.validation.images:
        raise ConfigError(
            f"{variant.name} is image-to-video but validation.images is empty: give one image per prompt"
        )
    if not variant.is_i2v and cfg.data.image_column:
        raise ConfigError(
            f"data.image_column is set but {variant.name} is text-to-video: remove it or use an I2V model"
        )
    if variant.learned_positional_embeddings:
        want = (variant.sample_height * VAE_SPATIAL_FACTOR, variant.sample_width * VAE_SPATIAL_FACTOR)
        sizes = {(h, w) for _, h, w in cfg.data.buckets} or {(cfg.data.height, cfg.data.width)}
        if sizes != {want}:
            raise ConfigError(
                f"{variant.name} has learned positional embeddings fixed at {want[0]}x{want[1]}: "
                f"set data.height={want[0]} and data.width={want[1]} (and no other bucket size)"
            )
