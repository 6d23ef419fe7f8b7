"""What never reaches a checkpoint (fastcog.nonfinite, fastcog.checkpoint_guard): a NaN in a batch is
skipped and counted, never stepped into the weights; K in a row stop the run; non-finite weights are
never saved; a full disk is one line and the earlier checkpoints stay loadable."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastcog.checkpoint_guard
from fastcog.checkpoint import list_checkpoints, read_trainable
from fastcog.cli import main
from fastcog.config import save_config
from tests.runs import copy_session_cache, make_cfg, read_lora, read_metrics

STEPS = 8  # two epochs of the 4 clips at batch 1


def config_file(tiny_checkpoint, clips, out: Path, cache: Path, **train) -> str:
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, data={"cache_dir": str(cache)},
                   train={"train_steps": STEPS, "batch_size": 1, **train},
                   checkpoint={"every_steps": 1, "limit": None})
    path = out.parent / f"{out.name}.yaml"
    save_config(cfg, path)
    return str(path)


@pytest.fixture(scope="module")
def poisoned_cache(tiny_checkpoint, clips, tmp_path_factory) -> Path:
    """A private latent cache of the 4 clips, the latents of one clip replaced by NaN: one that is not trained
    at step 1 (so the weights before each skipped step are in a checkpoint)."""
    from fastcog.config import load_config
    from fastcog.data.buckets import BucketBatchSampler
    from fastcog.data.prepare import plan
    from fastcog.inputs import check_inputs

    root = tmp_path_factory.mktemp("poisoned")
    cache = root / "cache"
    copy_session_cache(tiny_checkpoint("cogvideox-5b"), clips, cache)  # to poison, without encoding the clips
    path = config_file(tiny_checkpoint, clips, root / "run", cache)
    cfg = load_config(path)
    items, _ = plan(cfg, check_inputs(cfg, training=False)[1], need_images=False)
    first = next(iter(BucketBatchSampler([0] * len(items), cfg.train.batch_size, cfg.train.seed)))
    poisoned = next(it.paths.latents for it in items if it.index not in first)
    save_file({"latents": torch.full_like(load_file(str(poisoned))["latents"], math.nan)}, str(poisoned))
    return cache


def test_a_nan_batch_is_skipped_counted_and_never_stepped(tiny_checkpoint, clips, poisoned_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", config_file(tiny_checkpoint, clips, out, poisoned_cache)]) == 0
    rows = read_metrics(out)
    skipped = [r["step"] for r in rows if r["skipped"]]
    # The poisoned clip comes once in each of the 2 epochs.
    assert len(skipped) == 2
    assert all(math.isnan(r["loss"]) == r["skipped"] for r in rows)
    printed = capsys.readouterr()
    assert f"step {skipped[0]}: loss nan, gradient norm nan: not finite, step skipped" in printed.err + printed.out
    assert "2 non-finite steps skipped" in printed.out
    assert 1 not in skipped
    for step in skipped:  # the weights after a skipped step are exactly those before it
        before, after = read_trainable(out / f"checkpoint-{step - 1}"), read_trainable(out / f"checkpoint-{step}")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora = read_lora(out)
    assert all(bool(torch.isfinite(t).all()) for t in lora.values())
    first, last = read_trainable(out / "checkpoint-1"), read_trainable(out / f"checkpoint-{STEPS}")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the finite steps did train


def test_nan_steps_in_a_row_stop_the_run(tiny_checkpoint, clips, poisoned_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", config_file(tiny_checkpoint, clips, out, poisoned_cache, max_nonfinite_steps=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    bad = next(r["step"] for r in read_metrics(out) if r["skipped"])
    assert err.startswith(f"fastcog: error: 1 steps in a row had a non-finite loss or gradient (steps {bad}-{bad})")
    assert [s for s, _ in list_checkpoints(out)] == list(range(1, bad))  # none at or after the bad step


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    tensors = {"model": {"a.lora_A.weight": torch.ones(2, 2), "b.lora_B.weight": torch.tensor([[1.0, math.inf]])}}
    with pytest.raises(fastcog.checkpoint_guard.FastcogError, match="1 trainable tensors hold NaN or inf"):
        fastcog.checkpoint_guard.check_before_save(tensors, 7, tmp_path, is_main=True)
    tensors["model"]["b.lora_B.weight"][0, 1] = 0.0
    assert fastcog.checkpoint_guard.check_before_save(tensors, 7, tmp_path, is_main=True) == 24


@pytest.fixture()
def two_step_run(tiny_checkpoint, clips, tmp_path) -> tuple[str, Path]:
    out = tmp_path / "run"
    cfg = config_file(tiny_checkpoint, clips, out, clips / "cache", train_steps=4)
    return cfg, out


def stop_at_step_3(monkeypatch, fault) -> None:
    """Apply `fault` (a monkeypatch) once the checkpoints of steps 1 and 2 are written."""
    real, calls = fastcog.checkpoint_guard.check_before_save, []

    def check(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fault()
        return real(*args, **kwargs)

    monkeypatch.setattr("fastcog.checkpoint.check_before_save", check)


def assert_earlier_checkpoints_intact(out: Path) -> None:
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert not list(out.glob(".tmp-*"))
    assert read_trainable(out / "checkpoint-2")  # loadable


def test_a_full_disk_is_one_line_before_writing(two_step_run, monkeypatch, capsys):
    cfg, out = two_step_run

    def full() -> None:
        usage = shutil.disk_usage(out)
        monkeypatch.setattr(fastcog.checkpoint_guard.shutil, "disk_usage", lambda _: usage._replace(free=1000))

    stop_at_step_3(monkeypatch, full)
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastcog: error: not enough space for a checkpoint in {out}: it needs about ")
    assert "0.0 MB is free" in err and err.count("\n") == 1
    assert_earlier_checkpoints_intact(out)


def test_a_write_that_fails_half_way_is_one_line(two_step_run, monkeypatch, capsys):
    cfg, out = two_step_run

    def full() -> None:
        def save(*args, **kwargs):  # what torch.save raises when the disk fills up under it
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        monkeypatch.setattr(torch, "save", save)

    stop_at_step_3(monkeypatch, full)
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastcog: error: could not write checkpoint-3 in {out} (RuntimeError: [enforce fail")
    assert "free there" in err and err.count("\n") == 1
    assert_earlier_checkpoints_intact(out)
