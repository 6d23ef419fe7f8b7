"""Optimizers and LR schedules.

`build_optimizer(cfg, params, total_steps)` returns (optimizer, lr_scheduler); the schedule is
always diffusers' `get_scheduler`, as in the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from fastcog.config import Config


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    if o.name not in ("adamw", "adam"):
        raise NotImplementedError(f"optim.name={o.name!r} is not wired yet")
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[o.name]
    optimizer = cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, step_rules=o.lr_step_rules, num_warmup_steps=o.lr_warmup_steps,
        num_training_steps=total_steps, num_cycles=o.lr_num_cycles, power=o.lr_power,
    )
    return optimizer, lr_scheduler
