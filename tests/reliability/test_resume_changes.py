"""Resuming with a changed config (fastcog.resume): a change that would train something else is one
line naming the key and both values, before anything is written; a safe change is accepted, listed,
takes effect, and the folder keeps each segment's config."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from fastcog.cli import main
from fastcog.config import save_config
from fastcog.models import make_tiny
from tests.runs import make_cfg, read_metrics


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tiny_checkpoint, clips, tmp_path_factory) -> Path:
    """A 2-step run with checkpoint-2, and its config file (resume_from latest) beside it."""
    out = tmp_path_factory.mktemp("saved") / "run"
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, train={"train_steps": 2, "batch_size": 1},
                   optim={"lr_scheduler": "constant", "lr_warmup_steps": 0},
                   checkpoint={"every_steps": 2, "resume_from": "latest", "save_final": False})
    save_config(cfg, out.parent / "run.yaml")
    assert main(["train", str(out.parent / "run.yaml")]) == 0
    return out


@pytest.fixture(scope="module")
def other_base_model(tmp_path_factory) -> Path:
    """The same variant and shapes as the tiny 5B, other random weights."""
    return make_tiny("cogvideox-5b", tmp_path_factory.mktemp("other") / "model", seed=7, height=64, width=96, frames=9)


REFUSED = [
    ("lora.rank=8", "lora.rank changed from 4 to 8"),
    ("lora.alpha=16", "lora.alpha changed from 8.0 to 16.0"),
    ("lora.target_modules=[to_q]", "lora.target_modules changed from ['to_q', 'to_k', 'to_v', 'to_out.0'] to ['to_q']"),
    ("optim.name=adam", "optim.name changed from 'adamw' to 'adam'"),
    ("model.dtype=bf16", "model.dtype changed from 'fp32' to 'bf16'"),
    ("model.training_type=sft", "model.training_type changed from 'lora' to 'sft'"),
    ("train.seed=2", "train.seed changed from 1 to 2"),
    ("train.batch_size=2", "train.batch_size x processes changed from 1 x 1 to 2 x 1"),
    ("other base model", "model.path: other base weights than the checkpoint's"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=[c for c, _ in REFUSED])
def test_a_change_that_defines_the_trained_state_is_refused(saved_run, other_base_model, capsys, change, message):
    before = folder_digest(saved_run)
    override = f"model.path={other_base_model}" if change == "other base model" else change
    assert main(["train", str(saved_run.parent / "run.yaml"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastcog: error: {message}") and err.count("\n") == 1, err
    assert folder_digest(saved_run) == before  # config.yaml, segments and checkpoint-2 untouched


def test_a_safe_change_is_accepted_listed_and_takes_effect(saved_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    cfg = yaml.safe_load((saved_run.parent / "run.yaml").read_text())
    cfg["train"].update(output_dir=str(out), train_steps=3)
    cfg["optim"]["lr"] = 2e-3
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))

    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "resume: optim.lr: 0.001 -> 0.002 (accepted)" in printed
    assert "resume: train.train_steps: 2 -> 3 (accepted)" in printed
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 2e-3]  # the saved schedule's base lr was replaced
    segments = {p.name: yaml.safe_load(p.read_text())["optim"]["lr"] for p in (out / "segments").iterdir()}
    assert segments == {"config-from-step-0.yaml": 1e-3, "config-from-step-2.yaml": 2e-3}
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 2e-3
