"""Run configuration: YAML in, frozen dataclasses out.

One dataclass per section. Every option of the reference trainer has a home here with the
reference default, unless the field's docstring says why not. Unknown sections or keys are
errors that name the key and the closest valid one; `validate()` rejects combinations that
cannot train and says what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastcog.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")
# The names diffusers.optimization.get_scheduler accepts.
LR_SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "piecewise_constant",
)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local diffusers-format folder with transformer/ vae/ text_encoder/ tokenizer/ scheduler/."""
    variant: str = "auto"
    """Expected variant id (see fastcog.variants.VARIANTS) or `auto`; always detected from the
    transformer config, and a mismatch with an explicit value is an error."""
    dtype: str = "bf16"
    """Compute dtype, and the storage dtype of every frozen weight. The reference keeps frozen
    weights in fp32 under autocast; storing them in the compute dtype halves their memory."""
    training_type: str = "lora"
    """`lora` (adapters only) or `sft` (the whole transformer trains, kept in fp32)."""
    create_tiny: str | None = None
    """Demo and tests only: if model.path does not exist, first write a tiny random checkpoint
    of this variant there (`fastcog make-tiny`). Real runs leave this null."""
    i2v_image_scale: str = "pipeline"
    """1.5-I2V image-latent scaling: `pipeline` divides by the VAE scale as diffusers does at
    inference (correct); `reference` multiplies, reproducing the reference trainer's bug."""


@dataclass(frozen=True)
class DataConfig:
    data_root: str = ""
    """Folder the list files and the paths inside them are relative to."""
    caption_column: str = "prompts.txt"
    """List file with one caption per line (blank lines dropped)."""
    video_column: str = "videos.txt"
    """List file with one video path per line, relative to data_root."""
    image_column: str | None = None
    """I2V only, optional: list file of conditioning images; without it the first frame is used."""
    metadata_file: str | None = None
    """A CSV (header row) or JSONL file with caption / video / optional image columns, instead of
    the list files; paths relative to data_root."""
    num_frames: int = 49
    """Frames per training clip; must be 8N+1 (the VAE compresses 4x in time, plus frame 0)."""
    height: int = 480
    """Training height in pixels; a multiple of 16 (VAE 8x, patch 2)."""
    width: int = 720
    """Training width in pixels; a multiple of 16."""
    sampling: str = "reference"
    """Which frames of a clip: `reference` (stride N // F from frame 0), `uniform` (spread over the
    whole clip) or `random` (a seeded random window with the reference stride)."""
    resize: str = "stretch"
    """`stretch` to exactly height x width (reference) or `resize_crop` (keep aspect, centre crop)."""
    buckets: tuple[tuple[int, int, int], ...] = ()
    """Resolution buckets [frames, height, width]; each clip goes to the nearest by aspect ratio
    and length, and every batch has one shape. Empty: one bucket (num_frames, height, width)."""
    latent_mode: str = "sample"
    """Cached VAE latents: `sample` one posterior draw (reference) or `mean`."""
    max_failed_fraction: float = 0.05
    """Undecodable clips are skipped and listed in <cache_dir>/failures.jsonl; the run stops only
    when more than this fraction of the clips fails."""
    prepare_missing: bool = True
    """`fastcog train` encodes items missing from the cache itself; false makes it an error."""
    prepare_workers: int = 2
    """DataLoader workers decoding clips for `fastcog prepare` (0 = in the main process)."""
    cache_dir: str | None = None
    """Where encoded latents and text embeddings go; default `<data_root>/.fastcog_cache`."""
    vae_slicing: bool = True
    """VAE encodes a batch one sample at a time (less memory), for caching and the per-step I2V
    image encode; on by default, as the reference trainer."""
    vae_tiling: bool = True
    """VAE encodes in spatial tiles (much less memory at high resolution; slightly different
    latents once a frame exceeds the tile, 240 x 360 for the released VAEs), for caching and the
    per-step I2V image encode; on by default, as the reference trainer."""
    num_workers: int = 0
    """DataLoader worker processes for reading cached latents."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-device copies (ignored on CPU)."""
    synthetic_clips: int = 0
    """If > 0 and data_root holds no dataset yet, write this many synthetic mp4 clips there
    first (the demo; real runs leave this 0)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 128
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / rank (stored in the exported metadata)."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module name suffixes inside each transformer block that get an adapter."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    """`adamw`, `adam` (torch); `adamw8bit_bnb` (bitsandbytes AdamW8bit); `adamw8bit`, `adamw4bit`,
    `adamw_fp8` (torchao low-bit AdamW); `prodigy` (prodigyopt; set lr: 1.0; DDP, not FSDP, with
    several ranks); `came` (came-pytorch)."""
    fused: bool = False
    """torch adamw / adam only: the fused single-kernel implementation (`fused=True`)."""
    cpu_offload: bool = False
    """Keep optimizer state on the CPU and step there (torchao CPUOffloadOptimizer): less device
    memory, slower steps."""
    prodigy_d_coef: float = 1.0
    """prodigy only: multiplies its estimate of the step size D."""
    prodigy_safeguard_warmup: bool = True
    """prodigy only: leave the LR warm-up out of the D estimate (recommended with warm-up)."""
    came_betas3: float = 0.9999
    """came only: the third beta (the instability-confidence average); betas gives the first two."""
    came_eps1: float = 1e-30
    """came only: the first epsilon, added to the squared gradient (CAME's default). Not optim.eps (Adam's 1e-8):
    clipped to norm 1 over 5B LoRA r128's 132M values, a gradient value is ~8.7e-5 (RMS), its square ~7.6e-9,
    which an eps of 1e-8 would outweigh."""
    came_eps2: float = 1e-16
    """came only: the second epsilon, added to the squared instability (CAME's default)."""
    lr: float = 2e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 1e-4
    """Decoupled (AdamW) or L2 (Adam) weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; <= 0 disables clipping (the norm is still logged)."""
    lr_scheduler: str = "constant_with_warmup"
    """Any diffusers `get_scheduler` name."""
    lr_warmup_steps: int = 100
    """Warm-up optimizer steps."""
    lr_num_cycles: int = 1
    """Cycles for cosine_with_restarts."""
    lr_power: float = 1.0
    """Power for the polynomial schedule."""
    lr_step_rules: str | None = None
    """piecewise_constant only: diffusers step rules, e.g. "1:10,0.1:20,0.01:30,0.005"."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "outputs/run"
    """Where config.yaml, metrics.jsonl, checkpoints and the exported LoRA are written."""
    seed: int = 42
    """Seeds model init, data order, timesteps and noise."""
    batch_size: int = 1
    """Micro-batch size per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    train_epochs: int = 1
    """Passes over the dataset, unless train_steps is set."""
    train_steps: int | None = None
    """Optimizer steps; overrides train_epochs when set."""
    activation_checkpointing: str = "full"
    """Which activations each transformer block keeps for backward:
    `full` recompute the whole block in backward (the reference's gradient checkpointing);
    `none` keep everything (fastest, most memory);
    `selective` keep attention outputs and their log-sum-exp, recompute linears and pointwise ops;
    `auto` the fastest of these whose estimated memory fits (device memory - fast.memory_margin_gb),
    with a log line giving the choice and the estimate."""


@dataclass(frozen=True)
class FastConfig:
    """The fast path. Every switch off (the defaults) is the reference path, unchanged."""

    lora_kernel: bool = False
    """Run each LoRA linear through the fused Triton `lora_linear` (parameter names unchanged)."""
    fused_loss: bool = False
    """Noise and velocity-MSE loss through the fused Triton kernels (same draws, same loss)."""
    attention: str = "reference"
    """`reference`: diffusers' own CogVideoX attention processor. Otherwise fastcog's processor
    with an explicit backend: `auto` (best available for the device, logged), `sdpa` (torch
    chooses), `cudnn`, `flash`, `efficient`, `math` (SDPA backends), `fa3` (flash_attn_interface)
    or `flash_attn` (flash-attn 2) when installed."""
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing is applied)."""
    compile_fullgraph: bool = True
    """Ask torch.compile for one graph per block (an error on a graph break instead of a slowdown)."""
    fp8: str = "none"
    """Frozen base linears in FP8 (e4m3, no weight-gradient GEMM): `none`, `tensorwise` (one scale
    per tensor) or `rowwise` (one scale per row; more accurate)."""
    fp8_min_features: int = 1024
    """Only linears with in and out features both at least this use FP8 (small ones lose more to
    the casts than they gain)."""
    fp8_weight_storage: bool = False
    """Store frozen base weights in FP8 (e4m3, per-row scale) and widen them at use: about half the
    weight memory, slower matmuls. For low-memory runs; excludes `fp8`."""
    memory_margin_gb: float = 4.0
    """train.activation_checkpointing=auto: device memory kept free beyond the estimate."""


@dataclass(frozen=True)
class ParallelConfig:
    """How several processes (launched by torchrun) share the work."""

    strategy: str = "auto"
    """`fsdp` (FSDP2 fully_shard per block, then the root), `ddp`, `none`; `auto` is fsdp with
    more than one rank and none with one."""
    reshard_after_forward: bool = True
    """FSDP: free each block's gathered parameters after its forward and gather again in backward
    (less memory); false keeps them (one all-gather fewer per block)."""
    replicate_degree: int = 1
    """HSDP: replicate over this many groups (usually nodes) and shard within each; 1 = plain FSDP."""
    timeout_s: float = 600.0
    """A collective waiting longer than this (a stuck rank) ends the job with an error. A rank
    that dies ends the job at once: torchrun stops the others."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 200
    """Save `checkpoint-<step>/` every this many optimizer steps (0 = only at the end)."""
    limit: int | None = 10
    """Keep at most this many checkpoints (oldest removed first); null keeps all."""
    resume_from: str | None = None
    """`latest` (newest valid checkpoint in output_dir) or a checkpoint path; a path that does
    not exist is an error, never a silent fresh start."""
    save_final: bool = True
    """Also save a checkpoint at the last step."""
    async_save: bool = False
    """Write checkpoints with torch.distributed.checkpoint's async save (with or without torchrun),
    so the next steps run while the files are written; the folder is marked complete only once
    they are."""


@dataclass(frozen=True)
class LogConfig:
    report_to: str = "tensorboard"
    """`tensorboard`, `wandb` or `none`. metrics.jsonl is always written."""
    tracker_name: str = "fastcog"
    """wandb project / tensorboard run name."""
    progress_bar: bool = True
    """Show a tqdm bar (loss, lr, grad_norm, it/s)."""


@dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = 0
    """Render validation videos every this many optimizer steps (0 = never); must be a multiple
    of checkpoint.every_steps, as in the reference."""
    prompts: tuple[str, ...] = ()
    """Validation prompts."""
    images: tuple[str, ...] = ()
    """I2V: one conditioning image per prompt (paths relative to data_root or absolute)."""
    num_inference_steps: int = 50
    """Sampler steps."""
    guidance_scale: float = 6.0
    """Classifier-free guidance scale."""
    fps: int = 8
    """Frame rate of the written mp4."""
    seed: int = 42
    """Sampling seed."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)

# Keys that moved: an old config gets told where they went, not just "unknown".
RENAMED = {
    "train.gradient_checkpointing": "train.activation_checkpointing (full = true, none = false)",
    "train.objective": "fast.fused_loss (false = the reference objective)",
}
OPTIMIZERS = ("adamw", "adam", "adamw8bit_bnb", "adamw8bit", "adamw4bit", "adamw_fp8", "prodigy", "came")
ATTENTION_BACKENDS = ("reference", "auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "flash_attn")


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if f"{name}.{key}" in RENAMED:
            raise ConfigError(f"config key '{name}.{key}' was renamed: use {RENAMED[f'{name}.{key}']}")
        if key not in hints:
            hint = _closest(str(key), valid) or f" (valid keys: {', '.join(valid)})"
            raise ConfigError(f"unknown config key '{name}.{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict (sections of keys); unknown names are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping of sections (model:, data:, ...)")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{_closest(str(section), SECTIONS)}")
    return Config(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config dict."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping of sections (model:, data:, ...)")
    out = {k: dict(v) if isinstance(v, dict) else ({} if v is None else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.seed=1")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section '{section}'{_closest(section, SECTIONS)}")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {target!r}")
        target[key] = yaml.safe_load(text) if text.strip() else None
    return out


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides, build and validate it.

    Relative paths in the file (model.path, data.data_root, train.output_dir) are kept as
    written: they are relative to the working directory, like every other CLI path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    cfg = config_from_dict(apply_overrides(raw, overrides))
    validate(cfg)
    return cfg


def _choice(value: str, options: typing.Iterable[str], where: str) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{where}={value!r} is not one of {options}{_closest(value, options)}")


def validate(cfg: Config) -> None:
    """Reject configs that cannot train, with a message that says what to change."""
    from fastcog.variants import VARIANTS

    m, d, lo, o, t, c, v = cfg.model, cfg.data, cfg.lora, cfg.optim, cfg.train, cfg.checkpoint, cfg.validation
    if not m.path:
        raise ConfigError("model.path is not set: point it at a local diffusers-format CogVideoX folder")
    _choice(m.variant, ("auto", *VARIANTS), "model.variant")
    if m.create_tiny is not None:
        _choice(m.create_tiny, VARIANTS, "model.create_tiny")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.training_type, ("lora", "sft"), "model.training_type")
    _choice(m.i2v_image_scale, ("pipeline", "reference"), "model.i2v_image_scale")
    if not d.data_root:
        raise ConfigError("data.data_root is not set: point it at the folder holding the list files")
    if d.num_frames < 1 or (d.num_frames - 1) % 8 != 0:
        lower = max(1, (d.num_frames - 1) // 8 * 8 + 1)
        raise ConfigError(
            f"data.num_frames={d.num_frames} is not 8N+1: use {lower} or {lower + 8} "
            "(the VAE compresses time 4x after the first frame)"
        )
    for key in ("height", "width"):
        value = getattr(d, key)
        if value <= 0 or value % 16 != 0:
            raise ConfigError(
                f"data.{key}={value} is not a positive multiple of 16 (VAE 8x times patch 2): "
                f"use {max(16, round(value / 16) * 16)}"
            )
    for i, (frames, height, width) in enumerate(d.buckets):
        if frames < 1 or (frames - 1) % 8 or height <= 0 or height % 16 or width <= 0 or width % 16:
            raise ConfigError(
                f"data.buckets[{i}]={[frames, height, width]}: frames must be 8N+1 and height, width "
                "positive multiples of 16"
            )
    _choice(d.sampling, ("reference", "uniform", "random"), "data.sampling")
    _choice(d.resize, ("stretch", "resize_crop"), "data.resize")
    _choice(d.latent_mode, ("sample", "mean"), "data.latent_mode")
    if not 0.0 <= d.max_failed_fraction <= 1.0:
        raise ConfigError(f"data.max_failed_fraction={d.max_failed_fraction}: must be between 0 and 1")
    if d.num_workers < 0 or d.synthetic_clips < 0 or d.prepare_workers < 0:
        raise ConfigError("data.num_workers, data.prepare_workers and data.synthetic_clips must be >= 0")
    if lo.rank < 1:
        raise ConfigError(f"lora.rank={lo.rank}: must be >= 1")
    if not lo.target_modules:
        raise ConfigError("lora.target_modules is empty: list the linear layers to adapt, e.g. [to_q, to_k]")
    _choice(o.name, OPTIMIZERS, "optim.name")
    if o.fused and o.name not in ("adamw", "adam"):
        raise ConfigError(f"optim.fused=true applies to adamw / adam only, not optim.name={o.name!r}")
    if o.fused and o.cpu_offload:
        raise ConfigError("optim.fused and optim.cpu_offload exclude each other: choose one")
    if o.cpu_offload and o.name == "prodigy":
        raise ConfigError("optim.cpu_offload runs one optimizer per tensor, which would give Prodigy a separate "
                          "step-size estimate per tensor: set optim.cpu_offload: false or choose another optim.name")
    if o.cpu_offload and m.dtype == "fp16":
        raise ConfigError("optim.cpu_offload with model.dtype=fp16: the gradient scaler cannot unscale the "
                          "offloaded gradients; use model.dtype: bf16")
    if not all(0.0 <= b < 1.0 for b in (*o.betas, o.came_betas3)):
        raise ConfigError(f"optim.betas={list(o.betas)} / optim.came_betas3={o.came_betas3}: each must be in [0, 1)")
    if min(o.eps, o.came_eps1, o.came_eps2) < 0 or o.prodigy_d_coef <= 0:
        raise ConfigError("optim.eps, optim.came_eps1 and optim.came_eps2 must be >= 0 and optim.prodigy_d_coef > 0")
    _choice(o.lr_scheduler, LR_SCHEDULES, "optim.lr_scheduler")
    if o.lr_scheduler == "piecewise_constant" and not o.lr_step_rules:
        raise ConfigError("optim.lr_scheduler=piecewise_constant needs optim.lr_step_rules, e.g. '1:10,0.1'")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr}: must be > 0")
    if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ConfigError("train.batch_size and train.gradient_accumulation_steps must be >= 1")
    if t.train_steps is not None and t.train_steps < 1:
        raise ConfigError(f"train.train_steps={t.train_steps}: must be >= 1 or null (use train_epochs)")
    if t.train_epochs < 1:
        raise ConfigError(f"train.train_epochs={t.train_epochs}: must be >= 1")
    _choice(t.activation_checkpointing, ("none", "full", "selective", "auto"), "train.activation_checkpointing")
    f = cfg.fast
    _choice(f.attention, ATTENTION_BACKENDS, "fast.attention")
    _choice(f.fp8, ("none", "tensorwise", "rowwise"), "fast.fp8")
    if f.fp8 != "none" and f.fp8_weight_storage:
        raise ConfigError("fast.fp8 and fast.fp8_weight_storage exclude each other: FP8 matmuls already store "
                          "the frozen weights in FP8; set one of them")
    if (f.fp8 != "none" or f.fp8_weight_storage) and m.dtype == "fp32":
        raise ConfigError("fast.fp8 / fast.fp8_weight_storage need model.dtype bf16 or fp16, not fp32")
    if f.fp8_min_features < 16:
        raise ConfigError(f"fast.fp8_min_features={f.fp8_min_features}: must be >= 16 (FP8 GEMMs need "
                          "multiples of 16)")
    if f.memory_margin_gb < 0:
        raise ConfigError(f"fast.memory_margin_gb={f.memory_margin_gb}: must be >= 0")
    if t.activation_checkpointing == "selective" and f.attention == "reference":
        raise ConfigError("train.activation_checkpointing=selective keeps fastcog's attention outputs: set "
                          "fast.attention (auto, sdpa, ...) or use full / none")
    par = cfg.parallel
    _choice(par.strategy, ("auto", "fsdp", "ddp", "none"), "parallel.strategy")
    if par.replicate_degree < 1:
        raise ConfigError(f"parallel.replicate_degree={par.replicate_degree}: must be >= 1")
    if par.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s={par.timeout_s}: must be > 0")
    if c.every_steps < 0 or (c.limit is not None and c.limit < 1):
        raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.limit >= 1 (or null)")
    _choice(cfg.log.report_to, ("tensorboard", "wandb", "none"), "log.report_to")
    if v.every_steps:
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
        spatial = 8  # CogVideoX VAE
        want = (variant.sample_height * spatial, variant.sample_width * spatial)
        sizes = {(h, w) for _, h, w in cfg.data.buckets} or {(cfg.data.height, cfg.data.width)}
        if sizes != {want}:
            raise ConfigError(
                f"{variant.name} has learned positional embeddings fixed at {want[0]}x{want[1]}: "
                f"set data.height={want[0]} and data.width={want[1]} (and no other bucket size)"
            )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for writing config.yaml."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in SECTIONS
    }


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
