"""fastcog.plan_report's plan of a path as it ran, made once per path: its estimated peak and its predicted
step time, recorded beside the measured peak and step time."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fastcog.config import Config
    from fastcog.gpus import GpuSpec
    from fastcog.plan_report import Plan

CPU_REASON = "CPU run: the plan's step time is the executed FLOPs at a GPU's published rates (fastcog.gpus)"


def device_gpu(device: torch.device) -> GpuSpec | None:
    """The device's fastcog.gpus entry with its real memory (a bare one without rates for an unknown GPU);
    None on CPU."""
    from fastcog.plan_report import this_gpu

    return this_gpu(device) if device.type == "cuda" else None


def path_plan(cfg: Config, transformer_config: dict[str, Any], policy: str, gpu: GpuSpec | None) -> Plan:
    """make_plan for one path as the benchmark runs it: the bench's architecture (tiny, a checkpoint's or the
    variant's), its one shape, one micro-batch per optimizer step, the checkpointing policy the path applied.
    Without a GPU the plan is made against a stand-in with no rates: its memory holds, its step time is NaN."""
    from fastcog.gpus import GpuSpec
    from fastcog.plan_report import make_plan

    if gpu is None:
        gpu = GpuSpec("none", "no GPU", 0, math.nan, None, math.nan, "CPU run: no datasheet rates")
    run = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, buckets=()),
        train=dataclasses.replace(cfg.train, activation_checkpointing=policy, gradient_accumulation_steps=1))
    return make_plan(run, gpu, transformer_config=transformer_config)


def step_time_estimate(plan: Plan, gpu: GpuSpec | None) -> tuple[float | None, str]:
    """(the plan's predicted step time in seconds, what it is) or (None, why there is none)."""
    if gpu is None:
        return None, CPU_REASON
    predicted = plan.step_time_s
    if not math.isfinite(predicted):
        return None, f"{gpu.device_name} has no entry in fastcog.gpus: no datasheet rate to divide by"
    fp8 = f", FP8 {gpu.fp8_flops / 1e12:.0f} for the FP8 GEMMs" if plan.fp8_flops_per_step and gpu.fp8_flops else ""
    rate = plan.attention_rate
    attention = (f"{plan.attention.backend}'s published fwd {rate.forward_flops / 1e12:.0f} / bwd "
                 f"{rate.backward_flops / 1e12:.0f} TFLOP/s" if rate else
                 f"the bf16 peak ({plan.attention.backend}: no published rate)")
    return predicted, (f"predicted (an estimate): {plan.executed_flops_per_step / 1e12:.4g} TFLOP executed "
                       f"({plan.policy} recompute), attention at {attention}, the rest at the {gpu.key} datasheet "
                       f"peak, bf16 {gpu.bf16_flops / 1e12:.0f} TFLOP/s{fp8}; lower bound "
                       f"{plan.step_time_lower_bound_s:.4g} s")
