"""The fast path: the loaded CogVideoX transformer patched in place.

`apply_fast_path(transformer, cfg, device, tokens_per_sample=...)` applies, in this order:

1. FP8 for the frozen base linears (`fast.fp8`) or FP8 weight storage (`fast.fp8_weight_storage`);
2. the fused Triton LoRA linear (`fast.lora_kernel`), parameter names unchanged;
3. fastcog's attention processor with an explicit backend (`fast.attention`);
4. activation checkpointing per block (`train.activation_checkpointing`);
5. torch.compile per block (`fast.compile`).

FSDP (fastcog.parallel) wraps the blocks after this, so the order is the one FSDP2 needs:
checkpointing, then compile, then fully_shard. With every switch off this leaves the model
exactly as the reference runs it (diffusers' processor, diffusers' gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastcog.config import Config


@dataclass
class FastReport:
    """What was patched, for the log and the benchmark."""

    lines: list[str] = field(default_factory=list)
    attention_backend: str = "reference"
    activation_checkpointing: str = "full"
    fp8_linears: int = 0
    lora_kernel_linears: int = 0
    compiled_blocks: int = 0


def apply_fast_path(transformer: torch.nn.Module, cfg: Config, device: torch.device, *, tokens_per_sample: int,
                    verbose: bool = True) -> FastReport:
    """Patch `transformer` in place as cfg.fast / cfg.train.activation_checkpointing say."""
    report = FastReport(activation_checkpointing=cfg.train.activation_checkpointing)
    if cfg.train.activation_checkpointing == "full" and not _needs_fastcog_blocks(cfg):
        transformer.enable_gradient_checkpointing()
    elif cfg.train.activation_checkpointing != "none" or _needs_fastcog_blocks(cfg):
        raise NotImplementedError("fast path: work in progress")
    if verbose:
        for line in report.lines:
            print(line)
    return report


def _needs_fastcog_blocks(cfg: Config) -> bool:
    f = cfg.fast
    return f.lora_kernel or f.attention != "reference" or f.compile or f.fp8 != "none" or f.fp8_weight_storage
