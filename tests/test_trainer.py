"""The trainer end to end on tiny checkpoints: outputs, exact resume, export, dtypes, variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastcog.checkpoint import list_checkpoints, resolve_resume
from fastcog.config import config_from_dict, validate
from fastcog.data.synthetic import make_synthetic_dataset
from fastcog.errors import ConfigError, FastcogError
from fastcog.metrics import MetricsWriter
from fastcog.trainer import build_optimizer, train


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(root, num_clips=3, num_frames=9, height=64, width=96, seed=0, with_images=True)
    return root


def make_cfg(model_path: Path, data_root: Path, out: Path, **sections):
    raw = {
        "model": {"path": str(model_path), "dtype": "fp32"},
        "data": {"data_root": str(data_root), "num_frames": 9, "height": 64, "width": 96,
                 "cache_dir": str(data_root / "cache")},
        "lora": {"rank": 4, "alpha": 8},
        "optim": {"lr": 1e-3, "lr_warmup_steps": 2},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "train_steps": 4,
                  "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 2, "limit": 10},
        "log": {"report_to": "none", "progress_bar": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_everything(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, checkpoint={"every_steps": 1, "limit": 2},
                   log={"report_to": "tensorboard", "progress_bar": False})
    summary = train(cfg)
    assert summary.steps == 4 and len(summary.losses) == 4
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    assert (out / "config.yaml").is_file()
    assert config_from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())) == cfg
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(MetricsWriter.KEYS) <= set(rows[0])
    assert [r["loss"] for r in rows] == pytest.approx(summary.losses)
    assert rows[0]["mfu"] is None and rows[0]["mem_peak_gb"] is None  # CPU: not measurable
    assert rows[0]["tflops"] > 0 and rows[0]["tokens_per_s"] > 0
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]  # limit 2 keeps the newest two
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())


def test_resume_latest_continues_exactly(tiny_checkpoint, clips, tmp_path):
    """Stop after step 2, resume with `latest`: steps 3..6 equal those of an unbroken run.

    3 clips with batch 2 and accumulation 2 make the data order cross epoch boundaries
    mid-step, and a linear schedule makes the LR depend on the step: both must resume exactly.
    """
    model = tiny_checkpoint("cogvideox-5b")
    extra = {"train": {"train_steps": 6, "gradient_accumulation_steps": 2},
             "optim": {"lr_scheduler": "linear", "lr_warmup_steps": 1}}
    full = train(make_cfg(model, clips, tmp_path / "full", **extra))

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    cfg = make_cfg(model, clips, resumed_dir, checkpoint={"every_steps": 2, "resume_from": "latest"}, **extra)
    resumed = train(cfg)
    assert resumed.resumed_from == resumed_dir / "checkpoint-2"
    assert resumed.losses == full.losses[2:]  # bit-exact on CPU: same ops, same RNG, same data
    assert [r["step"] for r in read_metrics(resumed_dir)] == [1, 2, 3, 4, 5, 6]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed_dir / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_into_diffusers_with_alpha(tiny_checkpoint, clips, tmp_path):
    """The exported LoRA in CogVideoXPipeline gives the trained model's output (alpha != rank)."""
    from diffusers import CogVideoXPipeline

    from fastcog.build import load_transformer
    from fastcog.checkpoint import read_trainable
    from fastcog.lora import load_trainable_state_dict
    from fastcog.objective import RotaryCache

    model = tiny_checkpoint("cogvideox-5b")
    cfg = make_cfg(model, clips, tmp_path / "run", lora={"rank": 4, "alpha": 2}, optim={"lr": 5e-3})
    train(cfg)
    trained = load_transformer(cfg, torch.device("cpu"))
    load_trainable_state_dict(trained, read_trainable(tmp_path / "run" / "checkpoint-4"))
    pipe = CogVideoXPipeline.from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 3, 16, 8, 12, generator=g), torch.randn(1, 16, 32, generator=g)
    rope = RotaryCache(__import__("fastcog.models", fromlist=["x"]).read_variant(model))(3, 8, 12, x.device)
    t = torch.tensor([321])
    with torch.no_grad():
        ours = trained.eval()(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
        theirs = pipe.transformer(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
        base = CogVideoXPipeline.from_pretrained(model).transformer(x, text, t, image_rotary_emb=rope,
                                                                    return_dict=False)[0]
    assert (ours - base).abs().max() > 1e-3  # training changed the output, so the check has teeth
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_incomplete_checkpoints_are_never_latest(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "COMPLETE").write_text("ok\n")
    (tmp_path / "checkpoint-6").mkdir()  # killed mid-save: no marker
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-4"
    with pytest.raises(FastcogError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    with pytest.raises(FastcogError, match="does not exist"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)
    assert resolve_resume("latest", tmp_path / "empty") is None


def test_refuses_to_overwrite_an_earlier_run(tiny_checkpoint, clips, tmp_path):
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "run", train={"train_steps": 2})
    train(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="resume_from=latest"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_runs(tiny_checkpoint, clips, tmp_path, dtype):
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / dtype, model={"dtype": dtype},
                   train={"train_steps": 2, "activation_checkpointing": "full"})
    summary = train(cfg)
    assert len(summary.losses) == 2 and all(0 < loss < 100 for loss in summary.losses)


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def test_every_variant_trains(tiny_checkpoint, clips, tmp_path, variant):
    extra = {"data": {"image_column": "images.txt"}} if variant == "cogvideox-5b-i2v" else {}
    cfg = make_cfg(tiny_checkpoint(variant), clips, tmp_path / "run", train={"train_steps": 2}, **extra)
    summary = train(cfg)
    assert len(summary.losses) == 2 and all(0 < loss < 100 for loss in summary.losses)
    assert summary.export_path.is_file()


def test_full_finetune_exports_transformer(tiny_checkpoint, clips, tmp_path):
    cfg = make_cfg(tiny_checkpoint("cogvideox-2b"), clips, tmp_path / "sft", model={"training_type": "sft"},
                   optim={"name": "adam", "lr": 1e-4}, train={"train_steps": 2})
    summary = train(cfg)
    assert (summary.export_path / "config.json").is_file()
    from diffusers import CogVideoXTransformer3DModel

    before = CogVideoXTransformer3DModel.from_pretrained(tiny_checkpoint("cogvideox-2b"), subfolder="transformer")
    after = CogVideoXTransformer3DModel.from_pretrained(summary.export_path)
    pairs = zip(before.named_parameters(), after.named_parameters())
    changed = [n for (n, a), (_, b) in pairs if not torch.equal(a, b)]
    assert len(changed) > 10


def test_validation_videos_are_written(tiny_checkpoint, clips, tmp_path):
    from fastcog.data.video import decode_video

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "val", train={"train_steps": 2},
                   validation={"every_steps": 2, "prompts": ["a red square"], "num_inference_steps": 2})
    train(cfg)
    video = tmp_path / "val" / "validation" / "step-000002-prompt-0.mp4"
    frames = decode_video(video, 9, 64, 96)
    assert frames.shape == (9, 3, 64, 96)


def test_validation_without_write_renders_but_writes_nothing(tiny_checkpoint, clips, tmp_path, monkeypatch):
    """What ranks other than 0 do under FSDP: the pipeline runs (its forwards are collective
    there), nothing is written."""
    import fastcog.validation as validation
    from fastcog.models import load_components

    path = tiny_checkpoint("cogvideox-5b")
    cfg = make_cfg(path, clips, tmp_path / "val",
                   validation={"every_steps": 2, "prompts": ["a red square"], "num_inference_steps": 1})
    comps = load_components(path, "fp32")
    calls = []
    monkeypatch.setattr(validation, "write_video", lambda *a, **k: calls.append(a))
    forwards = []
    comps.transformer.register_forward_hook(lambda *a: forwards.append(1))
    assert validation.render_validation(cfg, comps, comps.transformer, tmp_path / "val", 2, torch.device("cpu"),
                                        write=False) == []
    assert forwards and not calls and not (tmp_path / "val").exists()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                      "constant_with_warmup", "piecewise_constant"])
def test_every_lr_schedule_builds_and_warms_up(schedule):
    from fastcog.config import OptimConfig

    param = torch.nn.Parameter(torch.zeros(2))
    cfg = config_from_dict({"optim": {"lr_scheduler": schedule, "lr_warmup_steps": 2,
                                      "lr_step_rules": "1:3,0.5" if schedule == "piecewise_constant" else None}})
    assert isinstance(cfg.optim, OptimConfig)
    opt, sched = build_optimizer(cfg, [param], total_steps=10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert all(lr >= 0 for lr in lrs)
    if schedule not in ("constant", "piecewise_constant"):
        assert lrs[0] < lrs[2] or lrs[0] == 0  # warm-up starts low
