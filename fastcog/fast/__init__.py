"""The fast path: the loaded CogVideoX transformer patched in place.

`apply_fast_path(transformer, cfg, device, tokens_per_sample=...)` applies, in this order:

1. FP8 for the frozen base linears (`fast.fp8`) or FP8 weight storage (`fast.fp8_weight_storage`);
2. the fused Triton LoRA linear (`fast.lora_kernel`) on every LoRA linear whose base is not FP8;
3. fastcog's attention processor with an explicit backend (`fast.attention`);
4. activation checkpointing per block (`train.activation_checkpointing`; `auto` decided here);
5. torch.compile per block (`fast.compile`).

FSDP (fastcog.parallel) shards the blocks after this, which is the order FSDP2 needs:
checkpointing, then compile, then fully_shard. Every patch keeps the module tree and the
parameter names, so checkpoints and the exported LoRA are the reference path's. With every
switch off, the model is left exactly as the reference runs it (diffusers' processor and
diffusers' own gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastcog.config import Config
from fastcog.errors import ConfigError
from fastcog.models import TORCH_DTYPES


@dataclass
class FastReport:
    """What was patched, for the log and the benchmark."""

    lines: list[str] = field(default_factory=list)
    attention_backend: str = "reference"
    activation_checkpointing: str = "full"
    fp8_linears: list[str] = field(default_factory=list)
    lora_kernel_linears: list[str] = field(default_factory=list)
    compiled_blocks: int = 0


def uses_fastcog_blocks(cfg: Config) -> bool:
    """Whether any switch changes the blocks (otherwise diffusers' own checkpointing is used)."""
    f = cfg.fast
    return (f.lora_kernel or f.attention != "reference" or f.compile or f.fp8 != "none" or f.fp8_weight_storage
            or cfg.train.activation_checkpointing in ("selective", "auto"))


def check_kernels_can_run(device: torch.device, what: str) -> None:
    if device.type == "cuda":
        return
    from fastcog.kernels._common import INTERPRET

    if not INTERPRET:
        raise ConfigError(
            f"{what} runs Triton kernels, which need a CUDA GPU (on {device.type}, only under "
            "TRITON_INTERPRET=1, for testing): set it to false here"
        )


def check_fast_path(cfg: Config, device: torch.device) -> None:
    """Fail before anything is written when a switch cannot run on this device."""
    if cfg.fast.lora_kernel:
        check_kernels_can_run(device, "fast.lora_kernel")
    if cfg.fast.fused_loss:
        check_kernels_can_run(device, "fast.fused_loss")
    if cfg.fast.attention != "reference":
        from fastcog.fast.attention import choose_backend

        choose_backend(cfg.fast.attention, device)


def apply_fast_path(transformer: torch.nn.Module, cfg: Config, device: torch.device, *, tokens_per_sample: int,
                    shards: int = 1, verbose: bool = True) -> FastReport:
    """Patch `transformer` (LoRA already injected, already on `device`) as cfg says.

    shards: how many ranks FSDP will shard the weights and optimizer state over afterwards
    (1 without FSDP); `auto` checkpointing counts only this rank's share of them.
    """
    f, report = cfg.fast, FastReport()
    check_fast_path(cfg, device)

    if f.fp8 != "none" or f.fp8_weight_storage:
        from fastcog.fast import fp8

        if f.fp8 != "none":
            report.fp8_linears = fp8.convert_linears_to_fp8(transformer, f.fp8, f.fp8_min_features)
            report.lines.append(f"fp8: {len(report.fp8_linears)} frozen linears use {f.fp8} FP8 matmuls")
        else:
            report.fp8_linears = fp8.convert_linears_to_fp8_storage(transformer, f.fp8_min_features)
            report.lines.append(f"fp8: {len(report.fp8_linears)} frozen linears store FP8 weights")

    if f.lora_kernel:
        from fastcog.fast.lora import use_fused_lora

        report.lora_kernel_linears = use_fused_lora(transformer)
        skipped = " (LoRA linears with an FP8 base keep peft's LoRA term)" if report.fp8_linears else ""
        report.lines.append(f"lora kernel: {len(report.lora_kernel_linears)} LoRA linears fused{skipped}")

    if f.attention != "reference":
        from fastcog.fast.attention import choose_backend, set_attention_backend

        choice = choose_backend(f.attention, device)
        set_attention_backend(transformer, choice.backend)
        report.attention_backend = choice.backend
        report.lines.append(f"attention: {choice.backend} ({choice.reason})")

    report.activation_checkpointing = _apply_checkpointing(transformer, cfg, device, tokens_per_sample, shards,
                                                           report)

    if f.compile:
        for block in transformer.transformer_blocks:
            block.compile(fullgraph=f.compile_fullgraph)
            report.compiled_blocks += 1
        report.lines.append(f"compile: {report.compiled_blocks} blocks (fullgraph={f.compile_fullgraph})")

    if verbose:
        for line in report.lines:
            print(line)
    return report


def _apply_checkpointing(transformer: torch.nn.Module, cfg: Config, device: torch.device, tokens_per_sample: int,
                         shards: int, report: FastReport) -> str:
    from fastcog.fast import checkpointing as ac

    policy = cfg.train.activation_checkpointing
    if not uses_fastcog_blocks(cfg):
        if policy == "full":  # the reference path, unchanged
            transformer.enable_gradient_checkpointing()
        return policy
    if policy == "auto":
        estimate = ac.estimate_block_activations(transformer, cfg.train.batch_size, tokens_per_sample,
                                                 TORCH_DTYPES[cfg.model.dtype], device)
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        margin = int(cfg.fast.memory_margin_gb * 2**30)
        free, where = ac.device_memory_budget(device, margin)
        # The weights are on the device whole now; after fully_shard this rank keeps 1/shards.
        weights = sum(t.nbytes for t in [*transformer.parameters(), *transformer.buffers()] if t.device == device)
        budget = free + weights * (shards - 1) // shards - ac.optimizer_bytes(trainable, cfg.optim.name) // shards
        policy = ac.choose_policy(estimate, budget)
        report.lines.append(
            f"activation checkpointing: auto chose {policy}; estimated peak activations "
            + ", ".join(f"{p} {_size(estimate.peak(p))}" for p in ac.POLICIES)
            + f"; budget {_size(budget)} ({where}, margin {cfg.fast.memory_margin_gb} GiB, "
            f"{tokens_per_sample} tokens x batch {cfg.train.batch_size}, weights over {shards} shard(s))"
        )
    else:
        report.lines.append(f"activation checkpointing: {policy}")
    ac.apply_checkpointing(transformer, policy)
    return policy


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
