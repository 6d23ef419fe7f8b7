"""The run configuration's sections: one frozen dataclass each, a docstring per field.

Every option of the reference trainer has a home here with the reference default, unless the
field's docstring says why not. A field that accepts a fixed set of strings is annotated
`Literal[...]` and fastcog.config checks values against the annotation, so the allowed values
are written once: here, or in the module that owns them (model.dtype in fastcog.dtypes,
optim.name in fastcog.optimizers, variants in fastcog.variants). Reading YAML, overrides and
`validate()` live in fastcog.config.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from fastcog.dtypes import DtypeName
from fastcog.optimizers import OptimizerName
from fastcog.variants import VariantName

# The names diffusers.optimization.get_scheduler accepts.
LrSchedule = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "piecewise_constant",
]
AttentionBackend = Literal["reference", "auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "flash_attn"]
# fast.lora_kernel: off, on (= auto: measured), or one implementation by name (fastcog.fast.lora_choice).
LoraKernel = Literal[False, True, "auto", "fused", "unfused"]

LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)
ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local diffusers-format folder with transformer/ vae/ text_encoder/ tokenizer/ scheduler/."""
    variant: Literal["auto", VariantName] = "auto"
    """Expected variant id (see fastcog.variants.VARIANTS) or `auto`; always detected from the
    transformer config, and a mismatch with an explicit value is an error."""
    dtype: DtypeName = "bf16"
    """Compute dtype, and the storage dtype of every frozen weight. The reference keeps frozen
    weights in fp32 under autocast; storing them in the compute dtype halves their memory."""
    training_type: Literal["lora", "sft"] = "lora"
    """`lora` (adapters only) or `sft` (the whole transformer trains, kept in fp32)."""
    create_tiny: VariantName | None = None
    """Demo and tests only: if model.path does not exist, first write a tiny random checkpoint
    of this variant there (`fastcog make-tiny`). Real runs leave this null."""
    i2v_image_scale: Literal["pipeline", "reference"] = "pipeline"
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
    sampling: Literal["reference", "uniform", "random"] = "reference"
    """Which frames of a clip: `reference` (stride N // F from frame 0), `uniform` (spread over the
    whole clip) or `random` (a seeded random window with the reference stride)."""
    resize: Literal["stretch", "resize_crop"] = "stretch"
    """`stretch` to exactly height x width (reference) or `resize_crop` (keep aspect, centre crop)."""
    buckets: tuple[tuple[int, int, int], ...] = ()
    """Resolution buckets [frames, height, width]; each clip goes to the nearest by aspect ratio
    and length, and every batch has one shape. Empty: one bucket (num_frames, height, width)."""
    latent_mode: Literal["sample", "mean"] = "sample"
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
    validation_fraction: float = 0.0
    """Hold out this fraction of the clips (rounded down; below 1) for the validation loss
    (validation.loss_every_steps): chosen by train.seed and each clip's path, never trained on.
    0: none. A held-out set from its own file (validation_metadata_file / validation_*_column)
    is the alternative."""
    validation_metadata_file: str | None = None
    """The held-out set as a CSV / JSONL file in metadata_file's format (relative to data_root);
    its clips are evaluated, never trained on, and must not also be in the training data."""
    validation_caption_column: str | None = None
    """The held-out set as list files instead: its caption file (caption_column's format, relative
    to data_root); needs validation_video_column."""
    validation_video_column: str | None = None
    """The held-out set's video list (video_column's format); needs validation_caption_column."""
    validation_image_column: str | None = None
    """I2V, optional: the held-out set's image list (image_column's format); without it each
    held-out clip's first frame is its condition."""


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
    name: OptimizerName = "adamw"
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
    lr_scheduler: LrSchedule = "constant_with_warmup"
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
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is NaN or inf is skipped (weights and optimizer state
    unchanged; it still counts as a step) and reported; this many in a row stop the run with an
    error. fp16's loss scaler skips overflowing gradients itself; only its non-finite losses count."""
    activation_checkpointing: Literal["none", "full", "selective", "offload", "auto"] = "full"
    """Which activations each transformer block keeps for backward:
    `full` recompute the whole block in backward (the reference's gradient checkpointing);
    `none` keep everything (fastest, most memory);
    `selective` keep attention outputs and their log-sum-exp, recompute linears and pointwise ops;
    `offload` as `full`, with each block's inputs kept in host memory instead of on the GPU
    (the least GPU memory: no activations stay on it between blocks);
    `auto` the fastest of these whose estimated memory fits (device memory - fast.memory_margin_gb),
    with a log line giving the choice and the estimate."""


@dataclass(frozen=True)
class FastConfig:
    """The fast path. Every switch off (the defaults) is the reference path, unchanged."""

    lora_kernel: LoraKernel = False
    """How each LoRA linear (plain or FP8 base) computes its LoRA term: `false` peft's forward (the
    reference); `fused` the Triton kernel that folds it into the base GEMM; `unfused` the base GEMM as
    the base layer runs it (cuBLAS, or FP8 `_scaled_mm`) with the LoRA term added into its output by
    addmm; `true` or `auto` the fastest of the three per layer shape, timed on the GPU at startup
    (cached in $FASTCOG_CACHE_DIR, default ~/.cache/fastcog; `fused` on a CPU), logged. Parameter
    names, checkpoints and the exported LoRA are the same whichever runs."""
    fused_qkv: bool = False
    """Each attention's q, k and v LoRA linears as one GEMM over their concatenated frozen weights (plain or
    rowwise-FP8 base) with one rank-3r LoRA down-projection, following fast.lora_kernel's choice for them
    (fused or unfused). Attentions it cannot fuse (peft's forward, tensorwise FP8, unequal ranks, FSDP)
    keep the three layers, logged. Parameter names, checkpoints and the exported LoRA are unchanged."""
    fused_loss: bool = False
    """Noise and velocity-MSE loss through the fused Triton kernels (same draws, same loss)."""
    attention: AttentionBackend = "reference"
    """`reference`: diffusers' own CogVideoX attention processor. Otherwise fastcog's processor
    with an explicit backend: `auto` (best available for the device, logged), `sdpa` (torch
    chooses), `cudnn`, `flash`, `efficient`, `math` (SDPA backends), `fa3` (flash_attn_interface)
    or `flash_attn` (flash-attn 2) when installed."""
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing is applied)."""
    compile_fullgraph: bool = True
    """Ask torch.compile for one graph per block (an error on a graph break instead of a slowdown)."""
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """Frozen base linears in FP8 (e4m3, no weight-gradient GEMM): `none`, `tensorwise` (one scale
    per tensor) or `rowwise` (one scale per row; more accurate)."""
    fp8_min_features: int = 1024
    """Only linears with in and out features both at least this use FP8 (small ones lose more to
    the casts than they gain)."""
    fp8_weight_storage: bool = False
    """Store frozen base weights in FP8 (e4m3, per-row scale) and widen them at use: about half the
    weight memory, slower matmuls. For low-memory runs; excludes `fp8`."""
    memory_margin_gb: float = 4.0
    """Device memory kept free beyond the estimate (fastcog.plan), by activation_checkpointing=auto
    and by the fit check."""
    fit_check: bool = True
    """On a GPU, before any weight is loaded: stop when the estimated peak exceeds the device's
    memory (naming the shortfall and a switch that fixes it), warn when it fits only within the
    margin. false: start anyway."""


@dataclass(frozen=True)
class ParallelConfig:
    """How several processes (launched by torchrun) share the work."""

    strategy: Literal["auto", "fsdp", "ddp", "none"] = "auto"
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
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """`tensorboard`, `wandb` or `none`. metrics.jsonl is always written."""
    tracker_name: str = "fastcog"
    """wandb project / tensorboard run name."""
    progress_bar: bool = True
    """Show a tqdm bar (loss, lr, grad_norm, it/s); when stderr is not a terminal (a SLURM log), a line
    every ~5% of the run instead."""
    plot: bool = True
    """Draw metrics.jsonl to `metrics.png` in the output dir at the end of the run (as `fastcog plot`)."""


@dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = 0
    """Render validation videos every this many optimizer steps (0 = never); must be a multiple
    of checkpoint.every_steps, as in the reference. Under torchrun with DDP each rank renders its
    share of the prompts; under FSDP every rank renders every prompt (each forward gathers the
    weights from all ranks, so all must run it) and rank 0 writes them."""
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
    """Sampling seed of the videos; also seeds the validation loss's noise (per sample and timestep)."""
    loss_every_steps: int = 0
    """Compute the loss on the held-out set (data.validation_fraction or data.validation_*) every
    this many optimizer steps, before the first step and at the last (0 = never); logged as
    `val_loss` and `val_loss_t<t>` per timestep. Cheap next to the videos: one eval-mode forward
    per held-out sample and timestep."""
    loss_quantiles: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """The validation loss's fixed timesteps, as fractions of the schedule (0.1 -> t=100 of 1000):
    the same timesteps and noise every time, so the values are comparable from step to step."""


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
