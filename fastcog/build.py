"""The model the loop trains, built in one visible order.

`build_training_model()` loads the transformer and hands it to `parallelize_model()`, which
applies, in this order and each only when configured:

  1. FP8 for the frozen base linears (fast.fp8), or FP8 weight storage (fast.fp8_weight_storage);
  2. each LoRA linear (plain or FP8 base) on the fused Triton kernel, cuBLAS + addmm or peft's own
     forward, chosen per shape (fast.lora_kernel; fastcog.fast.lora_choice);
  3. fastcog's attention processor with an explicit backend (fast.attention);
  4. activation checkpointing per block (train.activation_checkpointing; `auto` decided here), then
     q/k/v as one GEMM per attention (fast.fused_qkv; after `auto`'s estimate, which counts every
     weight once: the projections' weights become views of the concatenation);
  5. torch.compile per block (fast.compile);
  6. FSDP2 (FP8 weights made shardable, fully_shard per block, then the root) or DDP.

Why this order: steps 1-2 swap linears, which the processor, the checkpoint wrapper and the
compiled graph must already see; FSDP2 needs checkpointing, then compile, then fully_shard, so
that the checkpoint wrapper and the compiled block sit inside the sharded unit. Every step keeps
the module tree and the parameter names, so checkpoints and the exported LoRA are the reference
path's. With every switch off the model is left exactly as the reference runs it (diffusers'
processor and diffusers' own gradient checkpointing). The trainer and bench/throughput.py both
build through `parallelize_model`, so a change here reaches both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from fastcog.config import Config
from fastcog.fast import check_fast_path, uses_fastcog_blocks
from fastcog.lora import inject_lora
from fastcog.models import TORCH_DTYPES, load_components
from fastcog.parallel import SINGLE_PROCESS, Parallel, World, all_gather_objects, mixed_precision_dtype, parallelize


@dataclass
class FastReport:
    """What was patched, for the log and the benchmark."""

    lines: list[str] = field(default_factory=list)
    attention_backend: str = "reference"
    activation_checkpointing: str = "full"
    fp8_linears: list[str] = field(default_factory=list)
    lora_kernel_linears: list[str] = field(default_factory=list)
    """The LoRA linears on the fused Triton kernel (plain or FP8 base)."""
    lora_counts: dict[str, int] = field(default_factory=dict)
    """How many LoRA linears run each implementation: every label of fastcog.fast.lora.LABELS, zeros
    included; empty when fast.lora_kernel is off."""
    lora_choices: dict[str, dict] = field(default_factory=dict)
    """By distinct shape (LoraShape.key): the implementation, how it was chosen and the timings (ms)."""
    compiled_blocks: int = 0
    fused_qkv: int = 0
    """How many attentions run q/k/v as one GEMM (fast.fused_qkv)."""


@dataclass
class TrainingModel:
    par: Parallel
    """The (wrapped) transformer as the loop uses it."""
    params: list[torch.nn.Parameter]
    """The trainable parameters, taken after sharding (fully_shard replaces them)."""
    report: FastReport


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training_model(cfg: Config, device: torch.device, *, tokens_per_sample: int, world: World = SINGLE_PROCESS,
                         strategy: str = "none", verbose: bool = True) -> TrainingModel:
    """Load the transformer, add the adapters, then `parallelize_model`.

    Seeded first, so the LoRA initialisation is the same on every rank and in every run
    (whatever the data preparation drew from the RNG before): FSDP shards each rank's copy, so
    they must agree. tokens_per_sample: the largest video token count of any bucket (sizes
    `auto` checkpointing).
    """
    seed_everything(cfg.train.seed)
    transformer = load_transformer(cfg, device)
    return parallelize_model(transformer, cfg, device, tokens_per_sample=tokens_per_sample, world=world,
                             strategy=strategy, verbose=verbose)


def load_transformer(cfg: Config, device: torch.device) -> torch.nn.Module:
    """Frozen weights in the compute dtype (SFT: fp32 master weights, all trainable), LoRA
    adapters in fp32, on `device`, in train mode."""
    dtype = "fp32" if cfg.model.training_type == "sft" else cfg.model.dtype
    transformer = load_components(cfg.model.path, dtype, parts=("transformer",)).transformer
    return make_trainable(transformer, cfg).to(device).train()


def make_trainable(transformer: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """SFT: every weight trains (fp32); LoRA: the adapters (fp32) on the frozen weights. Also used by
    `fastcog plan` on a transformer with no weights (meta device), cast to the dtype loading gives."""
    if cfg.model.training_type == "sft":
        return transformer.to(torch.float32).requires_grad_(True)
    transformer.to(TORCH_DTYPES[cfg.model.dtype])
    inject_lora(transformer, cfg.lora)
    return transformer


def convert_fp8(transformer: torch.nn.Module, cfg: Config) -> tuple[list[str], str | None]:
    """Step 1 (fast.fp8 / fast.fp8_weight_storage): the converted linears and a log line."""
    f = cfg.fast
    if f.fp8 == "none" and not f.fp8_weight_storage:
        return [], None
    from fastcog.fast import fp8

    if f.fp8 != "none":
        names = fp8.convert_linears_to_fp8(transformer, f.fp8, f.fp8_min_features)
        return names, f"fp8: {len(names)} frozen linears use {f.fp8} FP8 matmuls"
    names = fp8.convert_linears_to_fp8_storage(transformer, f.fp8_min_features)
    return names, f"fp8: {len(names)} frozen linears store FP8 weights"


def parallelize_model(transformer: torch.nn.Module, cfg: Config, device: torch.device, *, tokens_per_sample: int,
                      world: World = SINGLE_PROCESS, strategy: str = "none", verbose: bool = True) -> TrainingModel:
    """Steps 1-6 (module docstring) on a loaded transformer whose trainable parameters are set."""
    f, report = cfg.fast, FastReport()
    check_fast_path(cfg, device)
    shards = world.world_size // cfg.parallel.replicate_degree if strategy == "fsdp" else 1

    report.fp8_linears, line = convert_fp8(transformer, cfg)  # 1
    if line:
        report.lines.append(line)

    if f.lora_kernel is not False:  # 2
        route_lora_linears(transformer, cfg, device, tokens_per_sample, world, report)

    if f.attention != "reference":  # 3
        from fastcog.fast.attention import choose_backend, set_attention_backend

        choice = choose_backend(f.attention, device)
        set_attention_backend(transformer, choice.backend)
        report.attention_backend = choice.backend
        report.lines.append(f"attention: {choice.backend} ({choice.reason})")

    report.activation_checkpointing = apply_checkpointing_policy(transformer, cfg, device, tokens_per_sample,  # 4
                                                                 shards, report)

    if f.fused_qkv:  # 4b: after the plan of step 4, which counts each weight once
        fuse_qkv(transformer, f.attention, strategy, report)

    if f.compile:  # 5
        from fastcog.fast.checkpointing import compile_blocks

        compile_blocks(transformer, f.compile_fullgraph)
        report.compiled_blocks = len(transformer.transformer_blocks)
        report.lines.append(f"compile: {report.compiled_blocks} blocks (fullgraph={f.compile_fullgraph})")

    param_dtype = mixed_precision_dtype(cfg.model.dtype)  # 6
    if strategy == "fsdp" and shard_fp8_weights(transformer):
        param_dtype = None
    par = parallelize(transformer, cfg.parallel, strategy, world, device, param_dtype)

    if verbose:
        for line in report.lines:
            print(line)
    return TrainingModel(par, [p for p in transformer.parameters() if p.requires_grad], report)


_LORA_WORDS = {"fused": "fused", "fused-fp8": "fused on an FP8 base", "unfused": "unfused",
               "unfused-fp8": "unfused on an FP8 base", "peft": "peft"}


def route_lora_linears(transformer: torch.nn.Module, cfg: Config, device: torch.device, tokens_per_sample: int,
                       world: World, report: FastReport) -> None:
    """Step 2: every LoRA linear's implementation (fastcog.fast.lora), chosen per shape (fastcog.fast.lora_choice).

    A shape's M is what each LoRA linear of a CogVideoX block sees per step: the batch times the video
    tokens plus the text tokens (attention and feed-forward run on both)."""
    from fastcog.fast import lora, lora_choice

    text = dict(getattr(transformer, "config", None) or {}).get("max_text_seq_length", 0)
    m = cfg.train.batch_size * (tokens_per_sample + text)
    dtype = TORCH_DTYPES[cfg.model.dtype]
    shapes = {name: lora_choice.shape_of(module, m, dtype)
              for name, module in lora.lora_linears(transformer) if lora.fusable(module)}
    chosen = lora_choice.choose(shapes.values(), cfg.fast.lora_kernel, device)
    by_shape = chosen.by_shape
    if world.distributed and device.type == "cuda" and lora_choice.resolve_mode(cfg.fast.lora_kernel) == "auto":
        by_shape = all_gather_objects(by_shape)[0]  # every rank runs rank 0's choice (timings differ a little)
    labels = lora.route_lora(transformer, {name: by_shape[shape].implementation for name, shape in shapes.items()})
    report.lora_kernel_linears = [name for name, lab in labels.items() if lab.startswith("fused")]
    report.lora_counts = {lab: sum(v == lab for v in labels.values()) for lab in lora.LABELS}
    report.lora_choices = {s.key: {"implementation": c.implementation, "source": c.source, "ms": c.ms}
                           for s, c in by_shape.items()}
    report.lines.extend(chosen.lines)
    counts = ", ".join(f"{n} {_LORA_WORDS[lab]}" for lab, n in report.lora_counts.items() if n) or "none"
    report.lines.append(f"lora kernel: {len(labels)} LoRA linears: {counts} ({chosen.summary})")


def fuse_qkv(transformer: torch.nn.Module, attention: str, strategy: str, report: FastReport) -> None:
    """Step 4b (fast.fused_qkv): q/k/v of each attention as one GEMM (fastcog.fast.qkv); logs what stays apart."""
    if strategy == "fsdp":  # fully_shard would shard the three weights but not their concatenation
        report.lines.append("fused qkv: off under FSDP (the concatenated weights would not be sharded)")
        return
    if attention == "reference":  # diffusers' processor calls the three layers
        report.lines.append("fused qkv: off (it runs in fastcog's attention processor: set fast.attention)")
        return
    from fastcog.fast import qkv

    report.fused_qkv, skipped = qkv.fuse_qkv(transformer)
    line = f"fused qkv: {report.fused_qkv} attentions"
    report.lines.append(line + "".join(f"; {n} keep three layers: {why}" for why, n in skipped.items()))


def apply_checkpointing_policy(transformer: torch.nn.Module, cfg: Config, device: torch.device,
                               tokens_per_sample: int, shards: int, report: FastReport) -> str:
    """Step 4; returns the policy applied. `auto` picks the fastest policy whose estimated
    activations fit next to this rank's share of the weights and optimizer state."""
    from fastcog.fast import checkpointing as ac

    policy = cfg.train.activation_checkpointing
    if not uses_fastcog_blocks(cfg):
        if policy == "full":  # the reference path, unchanged
            transformer.enable_gradient_checkpointing()
        return policy
    if policy == "auto":
        from fastcog.plan import memory_plan

        plan = memory_plan(transformer, cfg, tokens_per_sample, shards, device)
        margin = int(cfg.fast.memory_margin_gb * 2**30)
        total, in_use, where = ac.device_memory(device)
        # What is allocated besides this model (the VAE of I2V, ...) stays; the model's own
        # weights are on the device whole now, and the plan counts this rank's share of them.
        weights = sum(t.nbytes for t in [*transformer.parameters(), *transformer.buffers()] if t.device == device)
        capacity = total - margin - (in_use - weights)
        policy = plan.choose_policy(capacity, offload=device.type != "cpu")
        report.lines.append(
            f"activation checkpointing: auto chose {policy}; estimated peak "
            + ", ".join(f"{p} {_size(plan.peak(p))}" for p in ac.POLICIES)
            + f"; capacity {_size(capacity)} ({where}, margin {cfg.fast.memory_margin_gb} GiB, "
            f"{tokens_per_sample} tokens x batch {cfg.train.batch_size}, weights over {shards} shard(s))"
        )
    else:
        report.lines.append(f"activation checkpointing: {policy}")
    ac.apply_checkpointing(transformer, policy)
    return policy


def shard_fp8_weights(transformer: torch.nn.Module) -> bool:
    """Make the FP8 linears' weights frozen Parameters, for fully_shard; False if there are none.

    FSDP2 shards Parameters only; as buffers the FP8 weights would stay whole on every rank
    (9.5 GB per rank at 5B). Frozen, they stay out of the optimizer and of checkpoints (derived
    from the pretrained weights at conversion) and are all-gathered as FP8 bytes with the rest
    of their block.

    The caller then turns the parameter cast off (param_dtype None): a MixedPrecisionPolicy
    casts *every* floating parameter of a unit before the all-gather, FP8 ones included, which
    would gather bf16 copies (twice the bytes) and hand the FP8 matmul bf16 weights. Without the
    cast each tensor moves in its own dtype, and the fp32 LoRA adapters meet the transformer
    forward's autocast inside the block exactly as in one process (tests/test_fp8_fsdp.py: FSDP
    and DDP with the same per-rank batches give identical losses). The price is the adapters
    gathered in fp32: at 5B with rank 128 on four attention linears, 0.53 GB instead of 0.26 GB
    per pass, next to 9.5 GB of FP8 weights. A unit of its own per FP8 linear would put FSDP's
    hooks inside the compiled block and break its fullgraph compile.
    """
    from fastcog.fast.fp8 import fp8_modules

    modules = fp8_modules(transformer)
    for m in modules:
        m.weights_as_parameters()
    return bool(modules)


def module_summary(transformer: torch.nn.Module) -> list[str]:
    """One line per module: its name, class, attention processor, checkpointing and compilation.

    Two models built from one config give the same summary whatever built them.
    """
    from fastcog.fast.checkpointing import is_compiled

    lines = []
    for name, module in transformer.named_modules():
        line = f"{name or '<root>'}: {type(module).__name__}"
        if hasattr(module, "processor"):
            line += f" processor={type(module.processor).__name__}"
        if getattr(module, "_fastcog_checkpoint", None):
            line += f" checkpoint={module._fastcog_checkpoint}"
        if getattr(module, "gradient_checkpointing", False):
            line += " diffusers_checkpointing"
        if is_compiled(module):
            line += " compiled"
        if "forward" in vars(module):  # an instance-level forward: the fused LoRA or a checkpoint wrapper
            line += " patched_forward"
        lines.append(line)
    return lines


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
