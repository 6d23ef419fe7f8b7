"""The fast path's switches: which of them change the blocks, and whether they can run here.

The patches themselves live in this package's modules (fp8, lora, attention, checkpointing);
fastcog.build applies them in order.
"""

from __future__ import annotations

import torch

from fastcog.config import Config
from fastcog.errors import ConfigError


def uses_fastcog_blocks(cfg: Config) -> bool:
    """Whether any switch changes the blocks (otherwise diffusers' own checkpointing is used)."""
    f = cfg.fast
    return (f.lora_kernel or f.attention != "reference" or f.compile or f.fp8 != "none" or f.fp8_weight_storage
            or cfg.train.activation_checkpointing in ("selective", "offload", "auto"))


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
    if cfg.fast.lora_kernel not in (False, "unfused"):  # unfused runs no Triton
        check_kernels_can_run(device, "fast.lora_kernel")
    if cfg.fast.fused_loss:
        check_kernels_can_run(device, "fast.fused_loss")
    if cfg.fast.attention != "reference":
        from fastcog.fast.attention import choose_backend

        choose_backend(cfg.fast.attention, device)
