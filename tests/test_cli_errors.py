"""The real CLI on user mistakes: one `fastcog: error:` line, non-zero exit, no traceback, and an
earlier run in the same output directory left byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastcog", "train", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
    )


def base_config() -> dict:
    """A valid tiny run (paths relative to the working directory, as users write them)."""
    return {
        "model": {"path": "tiny-5b", "create_tiny": "cogvideox-5b", "dtype": "fp32"},
        "data": {"data_root": "clips", "synthetic_clips": 2, "num_frames": 9, "height": 64, "width": 96},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"output_dir": "out", "train_steps": 3, "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 1, "limit": 10},
        "log": {"report_to": "none", "progress_bar": False},
    }


def write_config(cwd: Path, raw: dict, name: str) -> str:
    (cwd / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return name


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path (folders recorded too)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding a finished tiny run: model, clips and output dir `out`."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli(cwd, write_config(cwd, base_config(), "good.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    return cwd


def make_list_dataset(cwd: Path, name: str, captions: list[str], videos: list[str]) -> str:
    """A data_root with its own list files; videos that exist are copies of the synthetic clips."""
    root = cwd / name
    root.mkdir()
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    real = sorted((cwd / "clips").rglob("*.mp4"))
    assert real, "the synthetic dataset has no mp4 files"
    for i, video in enumerate(videos):
        if not video.startswith("missing"):
            (root / video).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(real[i % len(real)], root / video)
    return name


def case_unknown_key(cwd: Path) -> tuple[dict, list[str]]:
    raw = base_config()
    raw["optim"] = {"lrr": 1e-3}
    return raw, ["optim.lrr", "'lr'"]


def case_missing_model(cwd: Path) -> tuple[dict, list[str]]:
    raw = base_config()
    raw["model"].update(path="no-such-model", create_tiny=None)
    return raw, ["no-such-model", "does not exist", "model.path"]


def case_missing_video(cwd: Path) -> tuple[dict, list[str]]:
    raw = base_config()
    root = make_list_dataset(cwd, "data_missing", ["a red square", "a blue ball"],
                             ["clip0.mp4", "missing_clip.mp4"])
    raw["data"].update(data_root=root, synthetic_clips=0)
    return raw, ["missing_clip.mp4", "missing"]


def case_frames(cwd: Path) -> tuple[dict, list[str]]:
    raw = base_config()
    raw["data"]["num_frames"] = 10
    return raw, ["data.num_frames=10", "8N+1", "use 9 or 17"]


def case_count_mismatch(cwd: Path) -> tuple[dict, list[str]]:
    raw = base_config()
    root = make_list_dataset(cwd, "data_counts", ["a red square", "a blue ball", "a green box"],
                             ["clip0.mp4", "clip1.mp4"])
    raw["data"].update(data_root=root, synthetic_clips=0)
    return raw, ["prompts.txt has 3", "videos.txt has 2"]


def case_rerun_into_used_output_dir(cwd: Path) -> tuple[dict, list[str]]:
    # The valid config again, without resume: it must refuse rather than overwrite the run.
    return base_config(), ["train.output_dir='out'", "checkpoint.resume_from=latest"]


CASES = {
    "unknown_key": case_unknown_key,
    "missing_model": case_missing_model,
    "missing_video": case_missing_video,
    "frames_not_8n1": case_frames,
    "caption_video_count_mismatch": case_count_mismatch,
    "rerun_into_used_output_dir": case_rerun_into_used_output_dir,
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_leaves_earlier_run_untouched(workspace: Path, case: str) -> None:
    raw, expected = CASES[case](workspace)
    assert raw["train"]["output_dir"] == "out"  # the same output dir as the earlier run
    cfg = write_config(workspace, raw, f"{case}.yaml")
    guarded = {name: tree_hashes(workspace / name) for name in ("out", "tiny-5b")}
    assert len(guarded["out"]) > 10

    proc = run_cli(workspace, cfg)

    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr; stdout: {proc.stdout}"
    last = lines[-1]
    assert last.startswith("fastcog: error:"), proc.stderr
    assert [line for line in lines if line.startswith("fastcog:")] == [last]  # exactly one error line
    for text in expected:
        assert text in last, f"{text!r} not in {last!r}"
    for name, before in guarded.items():
        after = tree_hashes(workspace / name)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{name}/ changed by a failed run: {changed}"
    assert not (workspace / "no-such-model").exists()


def test_set_override_error_through_the_cli(workspace: Path) -> None:
    cfg = write_config(workspace, base_config(), "override.yaml")
    before = tree_hashes(workspace / "out")
    proc = run_cli(workspace, cfg, "--set", "optim.lr_schedular=cosine")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("fastcog: error:") and "optim.lr_schedular" in last and "'lr_scheduler'" in last
    after = tree_hashes(workspace / "out")
    assert not sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
