"""The FP8 training runs of tests/test_fp8_fsdp.py: the kinds this CPU runs, their configs, and the
plan of the module's 2-rank launch (tests/torchrun.py's launch_many)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.torchrun import Call, raw_config

STEPS = 4


def _rowwise_scaled_mm_on_cpu() -> bool:
    """torch <= 2.11's CPU _scaled_mm takes per-tensor scales only (rowwise runs on GPUs there)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


ROWWISE_ON_CPU = _rowwise_scaled_mm_on_cpu()
KINDS = ["storage", "tensorwise"] + (["rowwise"] if ROWWISE_ON_CPU else [])


def fast_section(kind: str) -> dict:
    fp8 = {"fp8_weight_storage": True} if kind == "storage" else {"fp8": kind}
    return {**fp8, "fp8_min_features": 16}  # the tiny model's linears are 32 to 192 wide


def fp8_raw(data: dict[str, str], out: Path, kind: str, ranks: int = 1, **sections) -> dict:
    # Every 2 steps a checkpoint; full activation checkpointing on (the FP8 weights are gathered
    # again for the recomputation in the backward).
    base = {
        "model": {"dtype": "bf16"},
        "fast": fast_section(kind),
        "train": {"train_steps": STEPS, "activation_checkpointing": "full"},
        "checkpoint": {"every_steps": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return raw_config(data, out, ranks=ranks, **base)


def two_rank_plan(data: dict[str, str], root: Path) -> dict:
    """Every 2-rank run of tests/test_fp8_fsdp.py, for one launch: `worker` (test_fp8_fsdp's worker on 2
    ranks), `{kind}-fsdp` and `{kind}-ddp` (2 ranks x batch 1) for every kind, and `resumed`, the
    storage FSDP run resumed on 2 ranks from its checkpoint-2 (by path)."""
    (root / "worker").mkdir(parents=True, exist_ok=True)
    runs: dict = {"worker": Call("tests.test_fp8_fsdp:worker", [str(root / "worker"), data["model"], "1", *KINDS])}
    runs |= {f"{kind}-{how}": fp8_raw(data, root / f"{kind}-{how}", kind, ranks=2, parallel={"strategy": how})
             for kind in KINDS for how in ("fsdp", "ddp")}
    runs["resumed"] = fp8_raw(data, root / "resumed", "storage", ranks=2,
                              checkpoint={"resume_from": str(root / "storage-fsdp" / "checkpoint-2")})
    return runs
