"""What tests/test_distributed.py runs under torchrun in the suite's shared 2-rank launch (conftest.py's
two_rank_launch): the sections of the runs compared with one process (each test builds its in-process
reference from the same sections) and the plan of the 2-rank runs. The plan also holds tests/test_prepare.py's
2-rank `fastcog prepare` (`prepare`, on that module's dataset, MIXED_SPECS): a torchrun launch of its own
cost that test ~10 s of starting ranks, which the shared launch has already paid."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.media import make_mixed_dataset, truncate_file
from tests.torchrun import Call, raw_config, write_config

TORCHAO_LOW_BIT = ("adamw_fp8", "adamw8bit", "adamw4bit")  # in this order: see test_distributed's torchao test

BF16 = {"model": {"dtype": "bf16"}, "train": {"train_steps": 4, "activation_checkpointing": "full"},
        "checkpoint": {"every_steps": 0}}
PRODIGY = {"optim": {"name": "prodigy", "lr": 1.0}, "checkpoint": {"every_steps": 0}}
LOW_BIT = {"lora": {"rank": 256}, "checkpoint": {"every_steps": 0}}
SFT = {"model": {"training_type": "sft"}, "optim": {"name": "adam", "lr": 1e-4, "max_grad_norm": 1.0},
       "train": {"train_steps": 3}, "checkpoint": {"every_steps": 0}}


def two_rank_plan(data: dict[str, str], one_rank: Path, root: Path) -> dict:
    """Every 2-rank `fastcog train` run of tests/test_distributed.py that needs nothing but 2 ranks, in
    the order they run: name -> raw config; then tests/test_prepare.py's `prepare` (a Call). `one_rank` is
    the one-process reference run, whose checkpoint-4 `resume_on_two` resumes from (copied into its output
    folder, found as the latest)."""
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
    # test_prepare's: `fastcog prepare` of root/prepare/mixed into root/prepare/cache, as the CLI runs it.
    mixed = mixed_dataset(root / "prepare" / "mixed")
    raw = prepare_config(Path(data["model"]), mixed, root / "prepare" / "out",
                         data={"cache_dir": str(root / "prepare" / "cache")})
    runs["prepare"] = Call("tests.distributed_runs:prepare_as_the_cli", [str(write_config(raw, "prepare"))])
    return runs


# tests/test_prepare.py's dataset: several sizes, lengths and frame rates, the second clip corrupt.
MIXED_SPECS = [
    {"num_frames": 12, "height": 48, "width": 80, "fps": 8},
    {"num_frames": 20, "height": 64, "width": 96, "fps": 24},
    {"num_frames": 5, "height": 60, "width": 60, "fps": 12.5},
    {"num_frames": 30, "height": 96, "width": 64, "fps": 30},
    {"num_frames": 9, "height": 64, "width": 96, "fps": 10},
    {"num_frames": 17, "height": 40, "width": 40, "fps": 15},
]


def mixed_dataset(root: Path) -> Path:
    """MIXED_SPECS's 6 clips in `root`, the second truncated: one corrupt clip (another landscape clip
    remains)."""
    root = make_mixed_dataset(root, MIXED_SPECS, seed=0)
    videos = (root / "videos.txt").read_text().split()
    truncate_file(root / videos[1], 0.4)
    return root


def prepare_config(model: Path, data_root: Path, out: Path, **sections) -> dict:
    """tests/test_prepare.py's raw config: fp32 5B, 9 x 64 x 96, 3 steps of batch 1; `sections` update it."""
    raw = {
        "model": {"path": str(model), "dtype": "fp32"},
        "data": {"data_root": str(data_root), "num_frames": 9, "height": 64, "width": 96,
                 "max_failed_fraction": 0.2, "prepare_workers": 0},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"output_dir": str(out), "batch_size": 1, "train_steps": 3, "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 0},
        "log": {"report_to": "none", "progress_bar": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def prepare_as_the_cli(config_path: str) -> None:
    """`fastcog prepare CONFIG` on every rank of the launch (fastcog.cli.main, as `torchrun ... fastcog prepare`
    runs it), except that the CLI's closing shutdown_distributed leaves the launch's process group up."""
    import fastcog.parallel
    from fastcog.cli import main

    real = fastcog.parallel.shutdown_distributed
    fastcog.parallel.shutdown_distributed = lambda: None
    try:
        code = main(["prepare", config_path])
    finally:
        fastcog.parallel.shutdown_distributed = real
    assert code == 0, code


def low_bit_references(data: dict[str, str], root: Path) -> dict:
    """The one-process references of test_distributed's torchao test, in the order they run, each in
    root/<name>: `adamw` (fp32 states), then each of TORCHAO_LOW_BIT; LoRA rank 256, batch 2."""
    runs = {"adamw": raw_config(data, root / "adamw", **LOW_BIT)}
    runs |= {name: raw_config(data, root / name, optim={"name": name}, **LOW_BIT) for name in TORCHAO_LOW_BIT}
    return runs
