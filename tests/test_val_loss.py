"""The held-out set and its validation loss (fastcog.data.heldout, fastcog.val_loss).

One short run with the loss on is checked several ways (its banner, metrics rows, TensorBoard, what
its training loader read, the loss falling), against the same run with the loss off and against two
evaluations of the base model outside a run.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

import fastcog.trainer
from fastcog.data.cache import CachedDataset
from fastcog.data.heldout import split_heldout
from fastcog.data.listfile import read_dataset
from fastcog.errors import ConfigError
from fastcog.trainer import train
from tests.runs import make_cfg, read_metrics

# Held out: 1 of the 4 clips. configs/demo.yaml's LoRA (rank 16 on attention and feed-forward) at 10x its
# lr, so that 12 steps move the held-out loss clearly (with make_cfg's rank 4 on attention alone at lr 1e-2
# it fell by 1% only).
HELDOUT = {"data": {"validation_fraction": 0.25},
           "lora": {"rank": 16, "alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                                 "ff.net.2"]},
           "optim": {"lr": 3e-2, "lr_warmup_steps": 2},
           "train": {"train_steps": 12}, "checkpoint": {"every_steps": 0, "save_final": False}}
EVERY = 6


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, clips, tmp_path_factory):
    """(config, summary, printed stdout + stderr, latents files the training loader read) of the run with
    the loss on, and the summary of the same run with it off."""
    model, root = tiny_checkpoint("cogvideox-5b"), tmp_path_factory.mktemp("val_loss")
    read: list[Path] = []
    original = fastcog.trainer.micro_batches

    class Recording(CachedDataset):
        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            read.append(self.items[index].latents)
            return super().__getitem__(index)

    def recording(dataset: CachedDataset, *args, **kwargs):
        return original(Recording(dataset.items, dataset.dtype), *args, **kwargs)

    on = make_cfg(model, clips, root / "on", validation={"loss_every_steps": EVERY},
                  log={"report_to": "tensorboard", "progress_bar": True}, **HELDOUT)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        mp.setattr(fastcog.trainer, "micro_batches", recording)
        summary_on = train(on)
    summary_off = train(make_cfg(model, clips, root / "off", **HELDOUT))
    return on, summary_on, printed.getvalue(), read, summary_off


def heldout_dataset(cfg) -> tuple[list, CachedDataset]:
    """The run's split and its held-out dataset (the cache is complete: nothing is encoded)."""
    from fastcog.inputs import check_data, prepare_datasets

    variant, split = check_data(cfg)
    _, heldout = prepare_datasets(cfg, split, variant, torch.device("cpu"))
    return split, heldout


def test_validation_loss_rows_fall_and_reach_tensorboard(runs):
    cfg, summary, printed, _, _ = runs
    rows = [r for r in read_metrics(Path(cfg.train.output_dir)) if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 6, 12]  # before the first step, every 6, the last
    timesteps = [f"val_loss_t{t}" for t in range(100, 1000, 100)]
    assert all(set(timesteps) <= r.keys() for r in rows)
    assert all(r["val_loss"] == pytest.approx(sum(r[k] for k in timesteps) / 9, rel=1e-12) for r in rows)
    # It falls (measured: 1.34 -> 1.05 -> 1.00), and the training loss rows are untouched by the val rows.
    assert rows[2]["val_loss"] < rows[1]["val_loss"] < 0.9 * rows[0]["val_loss"], rows
    train_rows = [r for r in read_metrics(Path(cfg.train.output_dir)) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert f"step 12: val_loss {rows[2]['val_loss']:.6g} (1 held-out sample(s) x 9 timesteps" in printed
    banner = [line for line in printed.splitlines() if line.startswith("  validation")]
    assert len(banner) == 1 and "1 held-out sample (data.validation_fraction=0.25 of 4 clips" in banner[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.train.output_dir) / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("validation/val_loss")]
    assert logged == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in rows]
    assert "validation/val_loss_t500" in events.Tags()["scalars"]


def test_turning_the_loss_on_leaves_the_training_losses_unchanged(runs):
    _, on, _, _, off = runs
    assert on.losses == off.losses  # bit for bit: the evaluations draw from a forked, reseeded RNG


def test_heldout_clips_are_never_trained_on(runs):
    cfg, _, _, read, _ = runs
    split, heldout = heldout_dataset(cfg)
    assert len(heldout) == 1 and heldout.items[0].latents not in read  # what the training loader read
    # 12 steps of batch 2 over 3 clips: 6 epochs of a batch of 2 and a batch of 1, every read one of the 3.
    assert len(set(read)) == 3 and len(read) == 6 * 3
    assert len(split.heldout) == 1 and len(split.train) == 3


def test_evaluating_twice_gives_the_same_loss_bit_for_bit(runs):
    """Two evaluations of the base model outside the run: equal to each other and to the run's step 0
    (LoRA B starts at 0, so the run's model at step 0 computes exactly the base model)."""
    from fastcog.build import load_transformer
    from fastcog.models import load_components, read_variant
    from fastcog.parallel import SINGLE_PROCESS, Parallel
    from fastcog.val_loss import ValidationLoss

    cfg = runs[0]
    _, heldout = heldout_dataset(cfg)
    device = torch.device("cpu")
    transformer = load_transformer(cfg, device)
    comps = load_components(cfg.model.path, "fp32", parts=("scheduler",))
    par = Parallel("none", SINGLE_PROCESS, transformer, transformer, device)
    val = ValidationLoss(cfg, read_variant(cfg.model.path), comps, heldout, par)
    rng = torch.get_rng_state()
    first, second = val.evaluate(transformer), val.evaluate(transformer)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is where it was
    assert transformer.training  # back in train mode
    step0 = next(r for r in read_metrics(Path(cfg.train.output_dir)) if r.get("step") == 0)
    assert first == second == {k: v for k, v in step0.items() if k.startswith("val_loss")}


def test_heldout_set_errors_name_the_key(clips, tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("cogvideox-5b")
    samples = read_dataset(clips)

    def split(**data):
        return split_heldout(make_cfg(model, clips, tmp_path / "x", data=data), samples)

    with pytest.raises(ConfigError, match=r"data.validation_fraction=0.2 of 4 clips holds out none .* at least 0.25"):
        split(validation_fraction=0.2)
    with pytest.raises(ConfigError, match=r"data.validation_metadata_file='val.csv': .*val.csv does not exist"):
        split(validation_metadata_file="val.csv")
    with pytest.raises(ConfigError, match=r"data.validation_video_column='val_videos.txt': .* does not exist"):
        split(validation_caption_column="prompts.txt", validation_video_column="val_videos.txt")
    # A held-out file listing a training clip.
    (tmp_path / "val.csv").write_text(f"caption,video\nheld out,{clips / 'videos' / 'clip_001.mp4'}\n")
    with pytest.raises(ConfigError, match=r"data.validation_metadata_file=.* lists 1 clip\(s\) that are also training"):
        split(validation_metadata_file=str(tmp_path / "val.csv"))
    # The same file against the other three clips: held out, by file.
    by_file = split_heldout(make_cfg(model, clips, tmp_path / "x", data={"validation_metadata_file":
                                                                            str(tmp_path / "val.csv")}),
                            [s for s in samples if s.video.name != "clip_001.mp4"])
    assert [s.caption for s in by_file.heldout] == ["held out"] and len(by_file.train) == 3
    # The fraction split is the seed's and the clips' paths', not the list order's.
    half = split(validation_fraction=0.5)
    assert len(half.heldout) == 2
    again = split_heldout(make_cfg(model, clips, tmp_path / "x", data={"validation_fraction": 0.5}), samples[::-1])
    assert {s.video for s in again.heldout} == {s.video for s in half.heldout}
