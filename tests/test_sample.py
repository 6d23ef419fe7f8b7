"""`fastcog sample` through the real CLI (fastcog.cli.main, in this process) on tiny checkpoints.

The runs it samples are written as `fastcog train` leaves them, by the trainer's own writers
(save_config, export_lora, Checkpointer), from a LoRA with random nonzero B instead of a
training run: config.yaml, lora/pytorch_lora_weights.safetensors and checkpoint-1/. Each video
is rendered once per module (2 sampler steps, 9 frames, 32 x 48) and shared by the tests that
compare it.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

PROMPT = "A red square slides left!"
SIZE = ["--frames", "9", "--height", "32", "--width", "48"]  # what the runs below train at
STEPS = ["--steps", "2"]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`fastcog.cli.main(argv)` as `python -m fastcog` runs it: its status and its output (a
    traceback, if one escapes, is recorded as Python would print it)."""
    from fastcog.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as exit:
            code = exit.code
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def write_run(folder: Path, model: Path, is_i2v: bool, **model_keys: str) -> Path:
    """A finished LoRA run's folder: config.yaml, the exported LoRA and checkpoint-1, holding the
    same adapters (rank 4, alpha 8, so alpha / rank = 2 must be honoured alike)."""
    from fastcog.checkpoint import Checkpointer, TrainState
    from fastcog.config import config_from_dict, save_config
    from fastcog.lora import export_lora, inject_lora
    from fastcog.models import load_components
    from fastcog.parallel import SINGLE_PROCESS

    cfg = config_from_dict({"model": {"path": str(model), "dtype": "fp32", **model_keys},
                            "data": {"data_root": str(folder), "num_frames": 9, "height": 32, "width": 48},
                            "lora": {"rank": 4, "alpha": 8}, "train": {"output_dir": str(folder)}})
    folder.mkdir()
    save_config(cfg, folder / "config.yaml")
    transformer = load_components(model, "fp32", parts=("transformer",)).transformer
    params = inject_lora(transformer, cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 (peft's init) would leave the model unchanged
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    export_lora(transformer, cfg.lora, folder / "lora", is_i2v)
    optimizer = torch.optim.AdamW(params)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Checkpointer(folder, SINGLE_PROCESS).save(TrainState(step=1), transformer, optimizer, schedule)
    return folder


def write_image(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (48, 32), colour).save(path)
    return path


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny models (T2V 5B; 1.5-I2V, whose VAE inverts its scale), a run of each, two
    conditioning images and a prompts file."""
    root = tmp_path_factory.mktemp("sample")
    t2v, i2v = tiny_checkpoint("cogvideox-5b"), tiny_checkpoint("cogvideox1.5-5b-i2v")
    paths = {"t2v_model": t2v, "i2v_model": i2v, "root": root,
             "t2v_run": write_run(root / "t2v_run", t2v, is_i2v=False),
             # trained with the reference trainer's image scaling: sampling must follow it
             "i2v_run": write_run(root / "i2v_run", i2v, is_i2v=True, i2v_image_scale="reference"),
             "red": write_image(root / "red.png", (220, 30, 30)),
             "blue": write_image(root / "blue.png", (30, 30, 220)),
             "prompts": root / "prompts.txt"}
    paths["prompts"].write_text(f"\n{PROMPT}\n\n")  # blank lines are skipped
    return paths


@pytest.fixture(scope="module")
def video(files) -> Callable[[str], Path]:
    """name -> the mp4 of that render, rendered on first use."""
    f = files
    renders = {
        "base": ["--model", str(f["t2v_model"]), "--dtype", "fp32", *SIZE],
        "lora": [str(f["t2v_run"])],  # the size, dtype and LoRA come from the run
        "lora_again": [str(f["t2v_run"]), "--prompts-file", str(f["prompts"])],
        "lora_scale_0": [str(f["t2v_run"]), "--lora-scale", "0"],
        "checkpoint": [str(f["t2v_run"] / "checkpoint-1")],
        "i2v_red": [str(f["i2v_run"]), "--image", str(f["red"])],
        "i2v_blue": [str(f["i2v_run"]), "--image", str(f["blue"])],
        # the same LoRA without the run's config: the pipeline's image scaling
        "i2v_red_pipeline_scale": ["--model", str(f["i2v_model"]), "--lora", str(f["i2v_run"] / "lora"),
                                   "--dtype", "fp32", "--image", str(f["red"]), *SIZE],
    }
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = f["root"] / "renders" / name
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny tensors: OpenMP's hand-offs cost more than they share (~3x here)
            try:
                prompt = [] if "--prompts-file" in renders[name] else ["--prompt", PROMPT]
                proc = run_cli("sample", *renders[name], *prompt, *STEPS, "--out", str(out))
            finally:
                torch.set_num_threads(threads)
            assert proc.returncode == 0, proc.stderr[-3000:]
            (done[name],) = out.glob("*.mp4")
        return done[name]

    return get


def frames(path: Path) -> torch.Tensor:
    from fastcog.data.video import decode_video

    return decode_video(path, 9, 32, 48)


def differ(a: Path, b: Path) -> float:
    """Mean absolute difference of two decoded videos, in 8-bit levels."""
    return float((frames(a) - frames(b)).abs().mean()) * 127.5


# Renders of the same weights and seed are compared within SAME levels, not bit for bit: CPU float
# results are not bit-reproducible across renders in one process (MKL; seen in 2 of 3 runs of this
# file: one render off by 0.25 levels on average after encoding). What must change a video changes it
# by more than DIFFERENT (a LoRA ~7.7 levels, another image ~5.7, the image scale ~6.8).
SAME, DIFFERENT = 1.0, 3.0


@pytest.mark.parametrize("name", ["base", "lora"])
def test_video_decodes_with_its_size_and_the_contact_sheet_opens(video, name: str) -> None:
    """`base` asked for 9 x 32 x 48 (the model's own size is 64 x 96); `lora` got it from the run."""
    from PIL import Image

    from fastcog.data.video import probe_video

    path = video(name)
    assert path.name == "000-a-red-square-slides-left-seed42.mp4"
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (9, 32, 48)
    assert frames(path).shape == (9, 3, 32, 48)
    with Image.open(path.with_suffix(".png")) as sheet:
        sheet.load()
        assert sheet.size == (4 * 48 + 3 * 4, 32)  # 4 frames side by side, 4 px apart


def test_lora_changes_the_video_and_scale_zero_gives_the_base_model(video) -> None:
    assert differ(video("lora"), video("base")) > DIFFERENT
    assert differ(video("lora_scale_0"), video("base")) < SAME


def test_same_seed_gives_the_same_video(video) -> None:
    """The second render reads its prompt from --prompts-file."""
    assert differ(video("lora_again"), video("lora")) < SAME


def test_a_checkpoint_samples_as_the_exported_lora(video) -> None:
    """checkpoint-1 holds the same adapters under peft's names, without alpha in any metadata."""
    assert differ(video("checkpoint"), video("lora")) < SAME


def test_i2v_takes_its_image_and_the_runs_image_scale(video) -> None:
    assert differ(video("i2v_red"), video("i2v_blue")) > DIFFERENT
    assert differ(video("i2v_red"), video("i2v_red_pipeline_scale")) > DIFFERENT


def test_reference_image_scale_multiplies_the_image_latents(files) -> None:
    """1.5's VAE inverts its scale: the pipeline divides the image latents by it, a model trained with
    model.i2v_image_scale=reference saw them multiplied (fastcog.objective.encode_image)."""
    from fastcog.models import load_components
    from fastcog.render import make_pipeline

    comps = load_components(files["i2v_model"], "fp32")
    scale = comps.vae.config.scaling_factor
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    latents = {}
    for mode in ("pipeline", "reference"):
        pipe = make_pipeline(comps, comps.transformer, mode)
        _, latents[mode] = pipe.prepare_latents(image, 1, 16, 9, 32, 48, torch.float32, torch.device("cpu"),
                                                torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents["reference"], latents["pipeline"] * scale**2)


def error_cases(f: dict[str, Path]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, texts the error line must hold)."""
    unfinished = f["root"] / "unfinished_run"
    if not unfinished.exists():  # a run stopped before it exported: config.yaml and a checkpoint only
        unfinished.mkdir()
        (unfinished / "config.yaml").write_text((f["t2v_run"] / "config.yaml").read_text())
    return {
        "missing_run": ([str(f["root"] / "no_such_run"), "--prompt", "x"], ["no_such_run", "does not exist"]),
        "run_without_lora": ([str(unfinished), "--prompt", "x"],
                             ["has no exported LoRA", "lora/pytorch_lora_weights.safetensors", "--lora"]),
        "lora_file_missing": (["--model", str(f["t2v_model"]), "--lora", str(f["root"] / "x.safetensors"),
                               "--prompt", "x"], ["--lora", "no such file"]),
        "missing_image": ([str(f["i2v_run"]), "--prompt", "x", "--image", str(f["root"] / "gone.png")],
                          ["--image", "gone.png", "does not exist"]),
        "i2v_without_image": ([str(f["i2v_run"]), "--prompt", "x"],
                              ["image-to-video", "--image FILE"]),
        "image_for_t2v": ([str(f["t2v_run"]), "--prompt", "x", "--image", str(f["red"])],
                          ["text-to-video", "leave it out"]),
        "no_prompt": (["--model", str(f["t2v_model"])], ["--prompt", "--prompts-file"]),
        "frames_not_8n1": ([str(f["t2v_run"]), "--prompt", "x", "--frames", "10"], ["--frames 10", "8N+1"]),
    }


@pytest.mark.parametrize("case", ["missing_run", "run_without_lora", "lora_file_missing", "missing_image",
                                  "i2v_without_image", "image_for_t2v", "no_prompt", "frames_not_8n1"])
def test_a_mistake_is_one_line_saying_what_to_change(files, case: str) -> None:
    argv, texts = error_cases(files)[case]
    proc = run_cli("sample", *argv, "--out", str(files["root"] / "errors" / case))
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastcog: error:"), proc.stderr
    for text in texts:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not (files["root"] / "errors").exists()  # nothing written


def test_an_unfinished_run_points_at_its_newest_checkpoint(files, tmp_path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["t2v_run"], run)
    shutil.rmtree(run / "lora")
    proc = run_cli("sample", str(run), "--prompt", "x")
    assert proc.returncode == 2 and f"fastcog sample {run / 'checkpoint-1'}" in proc.stderr, proc.stderr
