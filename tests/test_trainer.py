"""The trainer end to end on tiny checkpoints: outputs, exact resume, export, dtypes, variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastcog.checkpoint import list_checkpoints, resolve_resume
from fastcog.config import config_from_dict
from fastcog.errors import ConfigError, FastcogError
from fastcog.metrics import MetricsWriter
from fastcog.trainer import build_optimizer, train
from tests.runs import make_cfg, read_lora, read_metrics


def transformer_output(transformer: torch.nn.Module, model_path) -> torch.Tensor:
    """The transformer's output for one fixed random input of the variant's shape (I2V: image latents
    as extra channels; 1.5: an even number of latent frames, ofs; RoPE where the variant uses it)."""
    from fastcog.models import read_variant
    from fastcog.objective import RotaryCache

    variant, c = read_variant(model_path), transformer.config
    frames = 4 if variant.patch_size_t else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, c.in_channels, 8, 12, generator=g)
    text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)
    rope = RotaryCache(variant)(frames, 8, 12, x.device) if variant.use_rope else None
    ofs = torch.tensor([2.0]) if variant.uses_ofs else None
    with torch.no_grad():
        return transformer.eval()(x, text, torch.tensor([321]), ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]


def assert_export_reproduces_training(model_path, cfg, checkpoint) -> None:
    """The exported LoRA, loaded by the variant's own diffusers pipeline (load_lora_weights, alpha read
    from the file), gives the output of the transformer with the trained weights of `checkpoint`, and
    training moved that output away from the base model's."""
    from diffusers import DiffusionPipeline

    from fastcog.build import load_transformer
    from fastcog.checkpoint import read_trainable
    from fastcog.lora import load_trainable_state_dict

    trained = load_transformer(cfg, torch.device("cpu"))
    # The checkpoint's model state also holds persistent buffers (5B-I2V's learned positional embedding).
    load_trainable_state_dict(trained, {k: v for k, v in read_trainable(checkpoint).items() if ".lora_" in k})
    pipe = DiffusionPipeline.from_pretrained(model_path)
    base = transformer_output(pipe.transformer, model_path)
    pipe.load_lora_weights(Path(cfg.train.output_dir) / "lora")
    ours, theirs = transformer_output(trained, model_path), transformer_output(pipe.transformer, model_path)
    # Training changed the output (by 3e-4 to 8e-4 after the 2 warm-up steps of test_every_variant_trains,
    # measured), far beyond the comparison's tolerance: the check has teeth.
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_run_writes_everything(tiny_checkpoint, clips, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, checkpoint={"every_steps": 1, "limit": 2},
                   log={"report_to": "tensorboard", "progress_bar": True, "plot": True})
    capsys.readouterr()  # what writing the tiny checkpoint printed
    summary = train(cfg)
    printed = capsys.readouterr()
    # The banner: one row per fact, before the first step. stderr is not a terminal here, so progress
    # comes as lines (every step: the run is shorter than 20 steps), not tqdm's redraws.
    rows = [line.split()[0] for line in printed.out.splitlines() if line.startswith("  ")]
    assert rows == ["data", "buckets", "trainable", "steps", "precision", "parallel", "attention", "checkpointing"]
    assert [line.split()[2] for line in printed.err.split("\n") if line.startswith("training: ")] == \
        ["1/4", "2/4", "3/4", "4/4"]
    assert printed.err.count("training: ") == 4  # a tqdm bar would redraw "training: ...|" many times
    assert summary.plot_path == out / "metrics.png" and summary.plot_path.stat().st_size > 20_000
    assert f"  plot           {out / 'metrics.png'}" in summary.lines()
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

    4 clips, batch 1 and accumulation 3: step 2 crosses an epoch boundary mid-step and ends
    mid-epoch, so the resumed run must restore the data position inside an epoch; a linear
    schedule makes the LR depend on the step.
    """
    model = tiny_checkpoint("cogvideox-5b")
    extra = {"train": {"train_steps": 6, "batch_size": 1, "gradient_accumulation_steps": 3},
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
    a, b = read_lora(tmp_path / "full"), read_lora(resumed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_into_diffusers_with_alpha(tiny_checkpoint, clips, tmp_path):
    """The exported LoRA in CogVideoXPipeline gives the trained model's output (alpha != rank)."""
    model = tiny_checkpoint("cogvideox-5b")
    cfg = make_cfg(model, clips, tmp_path / "run", lora={"rank": 4, "alpha": 2}, optim={"lr": 5e-3})
    train(cfg)
    assert_export_reproduces_training(model, cfg, tmp_path / "run" / "checkpoint-4")


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


def test_refuses_to_overwrite_an_earlier_run(tiny_checkpoint, clips, fp32_run):
    """The same config again, into the finished 2-step run of fp32_run (below; checkpoint-2 in it)."""
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, fp32_run, train=LOW_PRECISION_TRAIN)
    before = (fp32_run / "metrics.jsonl").read_bytes()
    assert [s for s, _ in list_checkpoints(fp32_run)] == [2]
    with pytest.raises(ConfigError, match="resume_from=latest"):
        train(cfg)
    assert (fp32_run / "metrics.jsonl").read_bytes() == before


# bf16 / fp16 against fp32: 2 steps, full checkpointing, the same seed and data. Relative differences of
# the per-step loss and pre-clip gradient norm, measured over train.seed 1-4 (steps 1 / 2):
#   bf16  loss up to 1.2e-2 / 8.0e-2, gradient norm up to 6.3e-3 / 1.4e-2
#   fp16  loss up to 1.5e-3 / 1.5e-3, gradient norm up to 3.4e-4 / 3.8e-4
# The loss weight 1 / (1 - abar) reaches ~1e3 at small t, which magnifies bf16's rounding of the
# prediction, and Adam's first updates are about lr x sign(gradient), so a gradient element that
# bf16 rounds across zero moves by a whole step: step 2 differs more than step 1. Tolerances about
# 2.5x the largest measurement: (loss, gradient norm), each per step.
LOW_PRECISION_RTOL = {"bf16": ((3e-2, 2e-1), (2e-2, 5e-2)), "fp16": ((5e-3, 5e-3), (5e-3, 5e-3))}
LOW_PRECISION_TRAIN = {"train_steps": 2, "activation_checkpointing": "full"}


@pytest.fixture(scope="module")
def fp32_run(tiny_checkpoint, clips, tmp_path_factory) -> Path:
    """The fp32 reference of test_low_precision_runs (also the earlier run test_refuses_to_overwrite_an_earlier_run
    runs into): its output folder."""
    out = tmp_path_factory.mktemp("fp32") / "run"
    train(make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, train=LOW_PRECISION_TRAIN))
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_runs(tiny_checkpoint, clips, tmp_path, dtype, fp32_run):
    """bf16 / fp16 weights and autocast train what fp32 trains, within their rounding: the per-step loss
    and the pre-clip gradient norm (fp16: after the loss scale is taken out) follow the fp32 run's, and
    the fp32 adapters are exported in fp32."""
    out, fp32_rows = tmp_path / dtype, read_metrics(fp32_run)
    summary = train(make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, model={"dtype": dtype},
                             train=LOW_PRECISION_TRAIN))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and summary.losses == [r["loss"] for r in rows]
    for row, want, loss_rtol, norm_rtol in zip(rows, fp32_rows, *LOW_PRECISION_RTOL[dtype], strict=True):
        assert row["loss"] == pytest.approx(want["loss"], rel=loss_rtol), (rows, fp32_rows)
        assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=norm_rtol), (rows, fp32_rows)
    assert [r["loss"] for r in rows] != [r["loss"] for r in fp32_rows]  # it did compute in low precision
    assert {v.dtype for v in read_lora(out).values()} == {torch.float32}


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def test_every_variant_trains(tiny_checkpoint, clips, tmp_path, variant):
    """Two steps of every other variant (cogvideox-5b: the tests above); the exported LoRA holds an A and
    a B for each of the 4 attention projections of every block, and loads into the variant's own
    diffusers pipeline (T2V or I2V) with the trained model's output."""
    from fastcog.checkpoint import read_trainable

    model = tiny_checkpoint(variant)
    extra = {"data": {"image_column": "images.txt"}} if variant == "cogvideox-5b-i2v" else {}
    cfg = make_cfg(model, clips, tmp_path / "run", train={"train_steps": 2}, **extra)
    summary = train(cfg)
    assert summary.steps == 2 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert summary.losses == [r["loss"] for r in read_metrics(tmp_path / "run")]
    exported = read_lora(tmp_path / "run")
    trained = {k: v for k, v in read_trainable(tmp_path / "run" / "checkpoint-2").items() if ".lora_" in k}
    num_layers = json.loads((Path(model) / "transformer" / "config.json").read_text())["num_layers"]
    assert len(exported) == 2 * 4 * num_layers
    assert exported.keys() == {"transformer." + name.replace(".default", "") for name in trained}
    assert all(torch.equal(exported["transformer." + name.replace(".default", "")], w) for name, w in trained.items())
    assert summary.export_path == tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    assert_export_reproduces_training(model, cfg, tmp_path / "run" / "checkpoint-2")


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
    """Named by step and prompt; logged to TensorBoard as an animated GIF under one tag per prompt."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastcog.data.video import decode_video

    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "val", train={"train_steps": 2},
                   validation={"every_steps": 2, "prompts": ["a red square"], "num_inference_steps": 2},
                   log={"report_to": "tensorboard"})
    train(cfg)
    video = tmp_path / "val" / "validation" / "step-000002-00-a-red-square.mp4"
    frames = decode_video(video, 9, 64, 96)
    assert frames.shape == (9, 3, 64, 96)
    events = EventAccumulator(str(tmp_path / "val" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("validation/00-a-red-square")
    assert image.step == 2 and image.encoded_image_string.startswith(b"GIF89a")
    assert (image.width, image.height) == (96, 64)


def test_validation_prompts_are_shared_across_ranks(tiny_checkpoint, clips, tmp_path):
    """DDP (or one process): rank r of w renders and writes prompts r, r + w, ...; FSDP: every rank
    renders every prompt (its forwards are collective there) and only rank 0 writes. Ranks 1 of 2
    without a process group (all_gather_objects then returns this rank's own list)."""
    from fastcog.models import load_components
    from fastcog.parallel import Parallel, World
    from fastcog.validation import run_validation

    path = tiny_checkpoint("cogvideox-5b")
    cfg = make_cfg(path, clips, tmp_path / "val", validation={
        "every_steps": 2, "prompts": ["a red square", "A blue circle!"], "num_inference_steps": 1})
    comps = load_components(path, "fp32")
    forwards = []
    comps.transformer.register_forward_hook(lambda *a: forwards.append(1))
    cpu, rank1 = torch.device("cpu"), World(rank=1, world_size=2)
    ddp = Parallel("ddp", rank1, comps.transformer, comps.transformer, cpu)
    videos = run_validation(cfg, comps, ddp, tmp_path / "val", 2, None)
    assert [v.path.name for v in videos] == ["step-000002-01-a-blue-circle.mp4"] and videos[0].path.is_file()
    one_prompt = len(forwards)
    fsdp = Parallel("fsdp", rank1, comps.transformer, comps.transformer, cpu)
    assert run_validation(cfg, comps, fsdp, tmp_path / "val", 4, None) == []
    assert len(forwards) == 3 * one_prompt  # both prompts rendered, nothing written
    assert [p.name for p in (tmp_path / "val" / "validation").iterdir()] == ["step-000002-01-a-blue-circle.mp4"]


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
