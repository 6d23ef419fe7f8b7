"""Mistakes a user can fix end as one `fastcog: error:` line (status 2) that names what to change,
found before the output directory or the cache is touched: an earlier run's files stay byte for byte.

Every case runs the real CLI entry (`fastcog.cli.main`) in this process; one runs `python -m fastcog`
to see a fresh process's whole stderr (the import-time lines of torchao, torch and bitsandbytes
included). Read-only folders are made with chmod; where that does not stop writes (root), os.access
is made to answer as for a read-only folder, so the check and its message are still exercised.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastcog.cli import main


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def one_error_line(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI; assert status 2 and exactly one stderr line, the error; return it."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastcog: error: "), err
    return lines[0]


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch):
    """Makes a folder read-only (chmod 555); restored afterwards so tmp cleanup works."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.chmod(0o555)
        made.append(path.absolute())
        if len(made) == 1 and os.access(path, os.W_OK):  # root: permission bits do not stop writes
            real = os.access

            def access(p, mode, *args, **kwargs):
                if mode & os.W_OK and Path(p).absolute() in made:
                    return False
                return real(p, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        return path

    yield make
    for path in made:
        path.chmod(0o755)


@pytest.fixture
def ws(tmp_path: Path, tiny_checkpoint, clips) -> dict:
    """An earlier run's output dir (`out`, no checkpoints: a run that got past the checks would rewrite its
    config.yaml) and a config for a run into it, with a cache folder that does not exist yet."""
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    (out / "config.yaml").write_text("earlier run\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"earlier weights")
    raw = {
        "model": {"path": str(tiny_checkpoint("cogvideox-5b")), "dtype": "fp32"},
        "data": {"data_root": str(clips), "num_frames": 9, "height": 64, "width": 96,
                 "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"output_dir": str(out), "train_steps": 1, "activation_checkpointing": "none"},
        "log": {"report_to": "none", "progress_bar": False},
    }
    return {"root": tmp_path, "out": out, "raw": raw, "before": tree_hashes(out), "cache": tmp_path / "cache"}


def write(ws: dict, name: str = "run.yaml", **sections: dict) -> str:
    raw = {k: dict(v) for k, v in ws["raw"].items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = ws["root"] / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def assert_nothing_written(ws: dict) -> None:
    assert tree_hashes(ws["out"]) == ws["before"]
    assert not ws["cache"].exists()


def test_lora_target_modules_naming_no_layer(ws, capsys) -> None:
    line = one_error_line(capsys, "train", write(ws), "--set", "lora.target_modules=[to_q,to_qq,norm1]")
    for text in ("lora.target_modules", "'to_qq' matches no layer (did you mean 'to_q'?)",
                 "'norm1' names a CogVideoXLayerNormZero", "attn1.to_k", "ff.net.2"):
        assert text in line, line
    assert "'to_q'" not in line.split("did you mean")[0]  # the good entry is not blamed
    assert_nothing_written(ws)


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_tracker_not_installed(ws, capsys, monkeypatch, tracker) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # imports of it fail, installed or not
    line = one_error_line(capsys, "train", write(ws, log={"report_to": tracker}))
    assert f"log.report_to={tracker}" in line and f"pip install {tracker}" in line, line
    assert "fastcog[" not in line
    assert_nothing_written(ws)


def test_output_dir_in_read_only_folder(ws, capsys, read_only) -> None:
    (ws["root"] / "locked").mkdir()
    parent = read_only(ws["root"] / "locked")
    line = one_error_line(capsys, "train", write(ws, train={"output_dir": str(parent / "run")}))
    assert f"train.output_dir={str(parent / 'run')!r}" in line and "read-only" in line, line
    assert not (parent / "run").exists()
    assert_nothing_written(ws)


def test_read_only_output_dir_of_an_earlier_run(ws, capsys, read_only) -> None:
    read_only(ws["out"])
    line = one_error_line(capsys, "train", write(ws))
    assert f"train.output_dir={str(ws['out'])!r}" in line and "read-only" in line, line
    assert_nothing_written(ws)


def copy_dataset(clips: Path, dst: Path) -> Path:
    shutil.copytree(clips, dst, ignore=shutil.ignore_patterns("cache", ".fastcog_cache"))
    return dst


def test_read_only_data_root_with_the_cache_beside_it(ws, capsys, read_only, clips) -> None:
    root = read_only(copy_dataset(clips, ws["root"] / "dataset"))
    line = one_error_line(capsys, "train", write(ws, data={"data_root": str(root), "cache_dir": None}))
    assert f"data.data_root={str(root)!r}" in line and "set data.cache_dir" in line, line
    assert "4 of 4 samples" in line, line
    assert not (root / ".fastcog_cache").exists()
    assert_nothing_written(ws)


def test_read_only_cache_dir(ws, capsys, read_only) -> None:
    (ws["root"] / "locked").mkdir()
    locked = read_only(ws["root"] / "locked")
    line = one_error_line(capsys, "train", write(ws, data={"cache_dir": str(locked / "cache")}))
    assert f"data.cache_dir={str(locked / 'cache')!r}" in line, line
    assert_nothing_written(ws)


def test_complete_cache_in_a_read_only_folder_passes_the_checks(tmp_path, read_only, tiny_checkpoint, clips) -> None:
    """Nothing to encode: the cache is only read, so its folder being read-only is no reason to stop."""
    from fastcog.data.prepare import plan
    from fastcog.errors import ConfigError
    from fastcog.inputs import check_inputs
    from tests.runs import make_cfg

    cache = tmp_path / "cache"
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", data={"cache_dir": str(cache)})
    items, _ = plan(cfg, check_inputs(cfg)[1], need_images=False)
    files = [p for it in items for p in (it.paths.latents, it.paths.prompt_embeds)]
    for path in files:  # stand-ins: the check looks at which items exist, not at their contents
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    read_only(cache)
    check_inputs(cfg)
    files[0].unlink()
    with pytest.raises(ConfigError, match=r"data.cache_dir=.*1 of 4 samples need encoding"):
        check_inputs(cfg)


def test_yaml_tab_and_syntax_errors_name_file_line_and_column(ws, capsys) -> None:
    tab = ws["root"] / "tab.yaml"
    tab.write_text("model:\n  path: x\ndata:\n\tdata_root: y\n")
    line = one_error_line(capsys, "train", str(tab))
    assert f"{tab}, line 4, column 1" in line and "YAML forbids tabs for indentation" in line, line
    bad = ws["root"] / "bad.yaml"
    bad.write_text("model:\n  path: x\n dtype: fp32\n")
    line = one_error_line(capsys, "train", str(bad))
    assert f"{bad}, line 3, column 2" in line and "not valid YAML" in line, line
    line = one_error_line(capsys, "train", write(ws), "--set", "lora.target_modules=[to_q")
    assert "--set 'lora.target_modules=[to_q'" in line and "not valid YAML" in line, line
    assert_nothing_written(ws)


def test_make_tiny_refuses_a_folder_that_is_not_empty(tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"real weights")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    before = {p: tree_hashes(p) for p in (ckpt, other)}
    line = one_error_line(capsys, "make-tiny", "cogvideox-2b", str(ckpt))
    assert f"{str(ckpt)!r} already holds a checkpoint" in line and "--overwrite" in line, line
    line = one_error_line(capsys, "make-tiny", "cogvideox-2b", str(other))
    assert f"{str(other)!r} already holds files" in line, line
    assert {p: tree_hashes(p) for p in (ckpt, other)} == before
    assert main(["make-tiny", "cogvideox-2b", str(other), "--overwrite"]) == 0
    assert (other / "model_index.json").is_file() and (other / "notes.txt").read_text() == "mine\n"


def test_a_fresh_process_prints_only_the_error_line(ws) -> None:
    """`python -m fastcog`: the libraries' import-time lines (torchao's unloadable extensions, torch's
    pytree deprecation, bitsandbytes' optional kernel) are filtered; the error is the whole stderr."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "fastcog", "train", write(ws), "--set", "lora.target_modules=[to_qq]"],
                          cwd=ws["root"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("fastcog: error: lora."), \
        proc.stderr
    assert_nothing_written(ws)


def test_tensorboard_after_resume_shows_each_step_once(tmp_path) -> None:
    """The interrupted run logged steps 1-5, its checkpoint is step 3; the resumed run logs 4-6."""
    pytest.importorskip("tensorboard", reason="log.report_to=tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastcog.metrics import MetricsWriter

    for resume_step, steps, offset in ((None, range(1, 6), 0.0), (3, range(4, 7), 10.0)):
        writer = MetricsWriter(tmp_path, "tensorboard", "run", {}, resume_step=resume_step)
        for step in steps:
            writer.write({"step": step, "loss": offset + step})
        writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    shown = [(event.step, event.value) for event in acc.Scalars("train/loss")]
    assert shown == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_a_complete_cache_in_a_read_only_folder_trains(tmp_path, read_only, tiny_checkpoint, clips) -> None:
    """A shared, already encoded dataset: training only reads the cache and leaves its reports alone. (The
    cache's files are the session's, copied; `fastcog prepare` finds them and writes the reports.)"""
    from fastcog.cli import main
    from fastcog.config import save_config
    from tests.runs import copy_session_cache, make_cfg

    cache = tmp_path / "cache"
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, tmp_path / "out", data={"cache_dir": str(cache)},
                   train={"train_steps": 1})
    save_config(cfg, tmp_path / "run.yaml")
    copy_session_cache(tiny_checkpoint("cogvideox-5b"), clips, cache)
    assert main(["prepare", str(tmp_path / "run.yaml")]) == 0
    reports = {name: (cache / name).stat() for name in ("manifest.json", "failures.jsonl", "notes.jsonl")}
    read_only(cache)
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    assert {name: (cache / name).stat() for name in reports} == reports  # not rewritten
