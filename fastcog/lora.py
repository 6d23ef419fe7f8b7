"""LoRA on the CogVideoX transformer: injection, trainable state, diffusers-format export.

Adapters are injected with peft through diffusers' `add_adapter`, so parameter names are
peft's (`...attn1.to_q.lora_A.default.weight`) and the exported file is what
`CogVideoXPipeline.load_lora_weights` expects. The reference exports without alpha, so
diffusers loads it at scale 1.0 instead of alpha / r; fastcog writes the adapter config
(alpha included) into the safetensors metadata, and loading reproduces training exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastcog.config import LoraConfig
from fastcog.config_validate import closest
from fastcog.errors import ConfigError

ADAPTER_NAME = "default"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def inject_lora(transformer: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Add LoRA adapters (A random, B zero: the model is unchanged at step 0); return them.

    The adapter weights are kept in fp32 whatever the base dtype (as the reference does):
    bf16 master weights would lose small Adam updates.
    """
    from peft import LoraConfig as PeftLoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            init_lora_weights=True,
            target_modules=list(cfg.target_modules),
            lora_dropout=0.0,
            bias="none",
        ),
        adapter_name=ADAPTER_NAME,
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


# The layer types peft's LoRA wraps (peft.tuners.lora.layer.dispatch_default); add_adapter fails on
# a target that names any other module.
ADAPTABLE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                   torch.nn.MultiheadAttention)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def check_target_modules(cfg: LoraConfig, transformer: torch.nn.Module) -> None:
    """Every lora.target_modules entry must name at least one layer LoRA can adapt, and only such layers.

    `transformer` may live on the meta device (fastcog.models.meta_transformer): only names and
    types are read. peft itself fails only when no entry matches at all, so a misspelt entry next
    to good ones would otherwise silently train fewer layers.
    """
    modules = [(name, module) for name, module in transformer.named_modules() if name]
    adaptable = [name for name, module in modules if isinstance(module, ADAPTABLE_TYPES)]
    problems = []
    for target in cfg.target_modules:
        hits = [module for name, module in modules if _matches(name, target)]
        wrong = [type(m).__name__ for m in hits if not isinstance(m, ADAPTABLE_TYPES)]
        if not hits:
            suffixes = {name.split(".", i)[-1] for name in adaptable for i in range(name.count(".") + 1)}
            problems.append(f"{target!r} matches no layer{closest(target, suffixes)}")
        elif wrong:
            problems.append(f"{target!r} names a {wrong[0]}, which LoRA cannot adapt")
    if problems:
        in_block = dict.fromkeys(name.split(".", 2)[2] for name in adaptable
                                 if name.startswith("transformer_blocks."))
        them = "it" if len(problems) == 1 else "them"
        raise ConfigError(f"lora.target_modules: {'; '.join(problems)}: fix or remove {them} (layers LoRA can "
                          f"adapt in each block: {', '.join(in_block)})")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its parameter name (LoRA: the adapters; SFT: everything)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back in place; every name must match both ways."""
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = wanted - state.keys(), state.keys() - wanted
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); was it saved with another "
            "lora.rank / lora.target_modules / model.training_type?"
        )
    with torch.no_grad():
        for name in wanted:
            params[name].copy_(state[name])


def lora_adapter_metadata(cfg: LoraConfig) -> dict[str, Any]:
    """The peft LoraConfig fields diffusers reads back from the safetensors metadata."""
    return {
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": sorted(cfg.target_modules),
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def export_lora(transformer: torch.nn.Module, cfg: LoraConfig, out_dir: Path, is_i2v: bool,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` in diffusers format, alpha in metadata.

    state_dict: full tensors to export instead of the module's own (under FSDP the module
    holds shards; the trainer gathers them to rank 0 first).
    """
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict

    pipe_cls = CogVideoXImageToVideoPipeline if is_i2v else CogVideoXPipeline
    layers = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(
        out_dir,
        transformer_lora_layers=layers,
        weight_name=LORA_WEIGHTS_NAME,
        transformer_lora_adapter_metadata=lora_adapter_metadata(cfg),
    )
    return out_dir / LORA_WEIGHTS_NAME
