"""The run's result in diffusers format, written by rank 0.

LoRA: <output_dir>/lora/pytorch_lora_weights.safetensors (alpha in the metadata); full
fine-tuning: <output_dir>/transformer, a diffusers folder. Under FSDP the trainable state is
first gathered to rank 0's CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcog.config import Config
from fastcog.lora import LORA_WEIGHTS_NAME, export_lora
from fastcog.parallel import Parallel, barrier
from fastcog.variants import VariantSpec


def export_weights(cfg: Config, par: Parallel, out: Path, variant: VariantSpec) -> Path:
    """LoRA: out/lora/pytorch_lora_weights.safetensors; SFT: out/transformer (a diffusers folder).

    Under FSDP the full trainable state is first gathered to rank 0 (on the CPU); under DDP and
    in one process rank 0 already holds it.
    """
    sft = cfg.model.training_type == "sft"
    path = out / "transformer" if sft else out / "lora" / LORA_WEIGHTS_NAME
    full = gather_full_state(par.module, trainable_only=not sft) if par.strategy == "fsdp" else None
    if par.world.is_main:
        if sft:
            save_transformer(par.module, path, full)
        else:
            export_lora(par.module, cfg.lora, path.parent, variant.is_i2v, state_dict=full)
    barrier()
    return path


def gather_full_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors on rank 0's CPU, by parameter name; empty on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=options)


def save_transformer(transformer: torch.nn.Module, path: Path, full: dict[str, torch.Tensor] | None) -> None:
    """save_pretrained of the trained transformer; from `full` (gathered tensors) when given.

    The gathered tensors are put into a parameter-less copy built on the meta device, so the
    export needs no second full model in memory.
    """
    if full is None:
        transformer.save_pretrained(path)
        return
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        plain = CogVideoXTransformer3DModel.from_config(transformer.config)
    plain.load_state_dict(full, assign=True)
    plain.save_pretrained(path)
