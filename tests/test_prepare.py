"""`fastcog prepare`: failures report, reuse, kill-and-rerun, torchrun sharding, buckets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastcog.config import config_from_dict, validate
from fastcog.data.prepare import cache_dir_for, plan, prepare
from fastcog.errors import DataError, FastcogError
from fastcog.inputs import check_inputs, make_encoder_factory
from fastcog.trainer import train
from tests.distributed_runs import mixed_dataset
from tests.distributed_runs import prepare_config as raw_config


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """tests/distributed_runs.py's MIXED_SPECS: 6 clips of several sizes, lengths and frame rates, one corrupt."""
    return mixed_dataset(tmp_path / "mixed")


def build(raw: dict):
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def run_prepare(cfg):
    variant, samples = check_inputs(cfg)
    return prepare(cfg, samples, variant.is_i2v, make_encoder_factory(cfg, torch.device("cpu"), variant),
                   show_progress=False)


def cache_contents(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(cache)): load_file(str(p)) for p in sorted(cache.rglob("*.safetensors"))}


def test_corrupt_clip_is_reported_and_skipped_then_everything_is_reused(tiny_checkpoint, mixed, tmp_path):
    cfg = build(raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out"))
    first = run_prepare(cfg)
    assert (first.encoded, first.reused, len(first.failures)) == (5, 0, 1)
    assert len(first.items) == 5
    report = [json.loads(line) for line in (cache_dir_for(cfg) / "failures.jsonl").read_text().splitlines()]
    assert len(report) == 1 and "clip_001" in report[0]["video"] and report[0]["reason"]
    manifest = json.loads((cache_dir_for(cfg) / "manifest.json").read_text())
    assert len(manifest["items"]) == 5
    for item in first.items:  # every cached item is whole and has the bucket's shape
        assert load_file(str(item.latents))["latents"].shape == (16, 3, 8, 12)

    second = run_prepare(cfg)
    assert (second.encoded, second.reused) == (0, 5)
    assert "0 encoded" in second.summary(cache_dir_for(cfg))


def test_too_many_failures_stop_the_run(tiny_checkpoint, mixed, tmp_path):
    cfg = build(raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out",
                           data={"max_failed_fraction": 0.1}))
    with pytest.raises(DataError, match="max_failed_fraction"):
        run_prepare(cfg)


def test_cache_key_changes_with_what_changes_the_content(tiny_checkpoint, mixed, tmp_path):
    """The keys are plan()'s file names, which prepare writes under, so they are compared without encoding
    5 x 6 clips; one prepare (latent_mode=mean, which no other test encodes with) checks that it writes
    under the planned names."""
    base = raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out")
    names, cfgs = {}, {}
    for label, data in {"base": {}, "crop": {"resize": "resize_crop"}, "uniform": {"sampling": "uniform"},
                        "mean": {"latent_mode": "mean"}, "size": {"height": 48}}.items():
        raw = json.loads(json.dumps(base))
        raw["data"].update(data)
        cfgs[label] = cfg = build(raw)
        variant, samples = check_inputs(cfg)
        names[label] = {it.paths.latents.name for it in plan(cfg, samples, variant.is_i2v)[0]}
        assert len(names[label]) == 6  # the corrupt clip too: it is keyed before anything decodes it
    assert all(names["base"].isdisjoint(other) for label, other in names.items() if label != "base")
    written = run_prepare(cfgs["mean"]).items
    assert len(written) == 5 and {it.latents.name for it in written} < names["mean"]  # all but the corrupt clip
    assert all(load_file(str(it.latents))["latents"].isfinite().all() for it in written)


def test_same_clips_elsewhere_give_the_same_latents(tiny_checkpoint, mixed, tmp_path):
    """The VAE sample and the random frame window are seeded from train.seed and the clip's path
    under data_root, not from the cache key (absolute paths, mtimes): a copied or regenerated
    dataset caches the same latents under other keys. A different train.seed draws others."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mixed, copy, copy_function=shutil.copy)  # new mtimes
    model = tiny_checkpoint("cogvideox-5b")

    def latents(root: Path, name: str, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
        raw = raw_config(model, root, tmp_path / f"out-{name}", data={"cache_dir": str(tmp_path / f"cache-{name}"),
                                                                      "sampling": "random"}, train={"seed": seed})
        items = run_prepare(build(raw)).items
        return [it.latents.name for it in items], [load_file(str(it.latents))["latents"] for it in items]

    keys, here = latents(mixed, "here")
    copy_keys, there = latents(copy, "there")
    assert len(here) == 5 and set(keys).isdisjoint(copy_keys)  # other keys, so nothing was reused
    assert all(torch.equal(a, b) for a, b in zip(here, there, strict=True))
    _, reseeded = latents(mixed, "seed1", seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(here, reseeded, strict=True))


def test_train_without_prepare_missing_requires_a_prepared_cache(tiny_checkpoint, mixed, tmp_path):
    raw = raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out", data={"prepare_missing": False})
    with pytest.raises(FastcogError, match="fastcog prepare"):
        train(build(raw))
    raw["data"]["prepare_missing"] = True
    run_prepare(build(raw))
    raw["data"]["prepare_missing"] = False
    raw["train"]["output_dir"] = str(tmp_path / "out2")
    assert len(train(build(raw)).losses) == 3


KILLER = """
import os, signal, sys
import fastcog.data.prepare as prep
real = prep.save_atomic
calls = {"n": 0}
def dying_save(tensors, path):
    calls["n"] += 1
    if calls["n"] == 4:  # the 4th file: write a partial temp file, then die mid-write
        (path.parent).mkdir(parents=True, exist_ok=True)
        path.with_name("." + path.name + ".partial.tmp").write_bytes(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, path)
prep.save_atomic = dying_save
from fastcog.cli import main
sys.exit(main(["prepare", sys.argv[1]]))
"""


def test_killed_prepare_resumes_and_leaves_a_valid_cache(tiny_checkpoint, mixed, tmp_path, capsys):
    """`fastcog prepare` SIGKILLed while writing its 4th file (a process of its own), then run again (here,
    through fastcog.cli.main as `python -m fastcog` calls it): the rerun keeps what was written whole,
    encodes the rest and leaves a complete, finite cache."""
    from fastcog.cli import main

    raw = raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    killed = subprocess.run([sys.executable, "-c", KILLER, str(cfg_path)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    cache = cache_dir_for(build(raw))
    assert not (cache / "manifest.json").exists()  # the killed run never got to the end
    partial_items = list(cache.rglob("*.safetensors"))
    assert 0 < len(partial_items) < 10

    capsys.readouterr()
    assert main(["prepare", str(cfg_path)]) == 0
    rerun = capsys.readouterr().out
    # The killed run finished one item (latents and prompt embedding, the first 2 of its writes) before
    # dying in its 4th: the rerun reuses that one, encodes the 4 other readable clips, and the corrupt
    # clip fails again.
    assert "prepare: 4 encoded, 1 reused, 1 failed" in rerun, rerun
    contents = cache_contents(cache)
    assert len(contents) == 10  # 5 clips x (latents + prompt embedding)
    manifest = json.loads((cache / "manifest.json").read_text())
    for item in manifest["items"]:
        assert load_file(str(cache / "latents" / item["latents"]))["latents"].isfinite().all()


def test_torchrun_two_ranks_make_the_same_cache_as_one(tiny_checkpoint, two_rank_launch, tmp_path):
    """`fastcog prepare` under torchrun on 2 ranks (each encodes its share; the `prepare` run of the suite's
    shared 2-rank launch, conftest.py, on a `mixed` dataset of its own) writes the cache one process writes
    (`prepare` in this process, as the CLI calls it, on the same clips)."""
    root, outcomes = two_rank_launch["distributed"]
    done = outcomes["prepare"]
    assert done.status == 0, done.stderr[-3000:]
    assert "5 encoded, 0 reused, 1 failed" in done.stdout, done.stdout  # rank 0 reports all ranks' work
    raw = raw_config(tiny_checkpoint("cogvideox-5b"), root / "prepare" / "mixed", tmp_path / "out1",
                     data={"cache_dir": str(tmp_path / "cache1")})
    run_prepare(build(raw))
    caches = {1: cache_contents(tmp_path / "cache1"), 2: cache_contents(root / "prepare" / "cache")}
    assert caches[1].keys() == caches[2].keys() and len(caches[1]) == 10
    for name, tensors in caches[1].items():
        for key, value in tensors.items():
            assert torch.equal(value, caches[2][name][key]), name


def test_bucketed_training_with_mixed_shapes(tiny_checkpoint, mixed, tmp_path):
    buckets = [[9, 64, 96], [9, 64, 64], [17, 96, 64]]
    raw = raw_config(tiny_checkpoint("cogvideox-5b"), mixed, tmp_path / "out",
                     data={"buckets": buckets, "resize": "resize_crop"}, train={"train_steps": 6})
    summary = train(build(raw))
    assert len(summary.losses) == 6 and all(0 < x < 100 for x in summary.losses)
    manifest = json.loads((cache_dir_for(build(raw)) / "manifest.json").read_text())
    assert len({tuple(item["bucket"]) for item in manifest["items"]}) == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["tokens_per_s"] / r["samples_per_s"] for r in rows}) > 1  # batches of different shapes ran
