"""What tests/test_distributed.py runs under torchrun in the suite's shared 2-rank launch (conftest.py's
two_rank_launch): the sections of the runs compared with one process (each test builds its in-process
reference from the same sections) and the plan of the 2-rank runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.torchrun import raw_config

TORCHAO_LOW_BIT = ("adamw_fp8", "adamw8bit", "adamw4bit")  # in this order: see test_distributed's torchao test

BF16 = {"model": {"dtype": "bf16"}, "train": {"train_steps": 4, "activation_checkpointing": "full"},
        "checkpoint": {"every_steps": 0}}
PRODIGY = {"optim": {"name": "prodigy", "lr": 1.0}, "checkpoint": {"every_steps": 0}}
LOW_BIT = {"lora": {"rank": 256}, "checkpoint": {"every_steps": 0}}
SFT = {"model": {"training_type": "sft"}, "optim": {"name": "adam", "lr": 1e-4, "max_grad_norm": 1.0},
       "train": {"train_steps": 3}, "checkpoint": {"every_steps": 0}}


def two_rank_plan(data: dict[str, str], one_rank: Path, root: Path) -> dict:
    """Every 2-rank `fastcog train` run of tests/test_distributed.py that needs nothing but 2 ranks, in
    the order they run: name -> raw config. `one_rank` is the one-process reference run, whose
    checkpoint-4 `resume_on_two` resumes from (copied into its output folder, found as the latest)."""
    resumed = root / "resume_on_two"
    resumed.mkdir(parents=True)
    shutil.copytree(one_rank / "checkpoint-4", resumed / "checkpoint-4")
    runs = {
        # FSDP2 on 2 ranks, batch 1 each, the same 12 steps; checkpoints written with async save.
        "two_ranks": raw_config(data, root / "two_ranks", ranks=2, checkpoint={"async_save": True}),
        "resume_on_two": raw_config(data, resumed, ranks=2, checkpoint={"resume_from": "latest"}),
        "bf16": raw_config(data, root / "bf16", ranks=2, **BF16),
        "prodigy_fsdp": raw_config(data, root / "prodigy_fsdp", ranks=2, **PRODIGY),
        "prodigy_ddp": raw_config(data, root / "prodigy_ddp", ranks=2, parallel={"strategy": "ddp"}, **PRODIGY),
        "sft": raw_config(data, root / "sft", ranks=2, **SFT),
        "ddp": raw_config(data, root / "ddp", ranks=2, parallel={"strategy": "ddp"}, train={"train_steps": 6}),
    }
    for name in TORCHAO_LOW_BIT:
        checkpoint = {"every_steps": 6 if name == "adamw4bit" else 0}
        runs[f"{name}_fsdp"] = raw_config(data, root / f"{name}_fsdp", ranks=2, optim={"name": name},
                                          **{**LOW_BIT, "checkpoint": checkpoint})
    # Resumes from the run above, in the same launch: its checkpoint-6 by path.
    runs["adamw4bit_resumed"] = raw_config(
        data, root / "adamw4bit_resumed", ranks=2, optim={"name": "adamw4bit"},
        **{**LOW_BIT, "checkpoint": {"every_steps": 0, "resume_from": str(root / "adamw4bit_fsdp" / "checkpoint-6")}})
    return runs


def low_bit_references(data: dict[str, str], root: Path) -> dict:
    """The one-process references of test_distributed's torchao test, in the order they run, each in
    root/<name>: `adamw` (fp32 states), then each of TORCHAO_LOW_BIT; LoRA rank 256, batch 2."""
    runs = {"adamw": raw_config(data, root / "adamw", **LOW_BIT)}
    runs |= {name: raw_config(data, root / name, optim={"name": name}, **LOW_BIT) for name in TORCHAO_LOW_BIT}
    return runs
