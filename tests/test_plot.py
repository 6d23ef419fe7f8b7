"""`fastcog plot`, the progress lines a non-terminal gets, the start-of-run banner and `--version`.

No model is trained here: the plot is drawn from hand-written metrics.jsonl files, the progress
display is driven with made-up steps and a fake clock, the banner is built from a config. The
trainer's use of all three is checked in tests/test_trainer.py::test_run_writes_everything.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from fastcog.cli import main
from fastcog.errors import FastcogError
from fastcog.plot import figure, read_rows, smooth
from fastcog.progress import BarProgress, LineProgress, iter_progress, line_every, step_progress


def training_row(step: int, loss: float, skipped: bool = False) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 0.5 / step,
            "step_time_s": 0.1, "samples_per_s": 20.0 + step, "tokens_per_s": 1e3, "tflops": 0.01, "mfu": None,
            "mem_peak_gb": None, "skipped": skipped}


def write_metrics(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    # json.dumps writes NaN as the bare token NaN, as MetricsWriter does for a non-finite loss.
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def lines_of(ax) -> dict[str, tuple[list, list]]:
    """An axes' lines by label (unlabelled ones as _child<n>), as (x, y) lists."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_the_plot_draws_the_files_series(tmp_path, capsys):
    """The loss panel holds the file's losses (the NaN of a skipped step left out), their smoothing and
    the validation rows, which sit in rows of their own between training rows; a last line cut short
    by a kill is ignored; the PNG is written at the figure's size."""
    losses = [1.0, 0.9, 0.8, float("nan"), 0.7, 0.6, 0.65, 0.5]
    rows = [training_row(s, v, skipped=math.isnan(v)) for s, v in enumerate(losses, 1)]
    rows.insert(4, {"step": 4, "val_loss": 0.85})
    rows.append({"step": 8, "val_loss": 0.62})
    run = write_metrics(tmp_path / "run", rows, tail='{"step": 9, "loss": 0.4')
    fig = figure(read_rows(run))
    loss_ax, lr_ax, _, thr_ax = fig.axes
    drawn = lines_of(loss_ax)
    steps, values = zip(*[(s, v) for s, v in enumerate(losses, 1) if not math.isnan(v)])
    assert drawn["train (each step)"] == (list(steps), list(values))
    smoothed = next(v for k, v in drawn.items() if k.startswith("train (smoothed"))
    assert smoothed == (list(steps), pytest.approx(smooth(values, 1)))
    assert drawn["validation"] == ([4, 8], [0.85, 0.62])
    assert "1 non-finite steps skipped" in loss_ax.get_title()
    assert lines_of(lr_ax)["_child0"][1] == pytest.approx([r["lr"] for r in rows if "lr" in r])
    assert lines_of(thr_ax)["_child0"][0] == list(range(2, 9))  # every training row but the warm-up step

    # Through the CLI, to the path asked for (the default, RUN_DIR/metrics.png, is the trainer's: test_trainer).
    png = tmp_path / "elsewhere" / "p.png"
    assert main(["plot", str(run), "--out", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}" and not (run / "metrics.png").exists()
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1100, 700)
    assert 20_000 < png.stat().st_size < 1_000_000


def test_without_validation_rows_there_is_no_validation_line(tmp_path):
    run = write_metrics(tmp_path / "run", [training_row(s, 1.0 / s) for s in range(1, 5)])
    assert "validation" not in lines_of(figure(read_rows(run)).axes[0])


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 10) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0 at the start
    assert smooth([0.0, 1.0], 3) == pytest.approx([0.0, 0.5 / 0.75])


@pytest.mark.parametrize(("content", "message"), [
    (None, "has no metrics.jsonl"),
    ("", "holds no steps yet"),
    ("\n\n", "holds no steps yet"),
    ('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n', "line 2 is not JSON"),
])
def test_nothing_to_plot_is_one_error_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(FastcogError, match=message):
        read_rows(run)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastcog: error: cannot plot") and message in err, err


def test_version_has_one_home(capsys):
    """`fastcog --version` prints fastcog.__version__, which is also what setup.py installed."""
    from importlib.metadata import version

    import fastcog

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastcog {fastcog.__version__}"
    assert version("fastcog") == fastcog.__version__


# --- progress --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "every"), [(1, 1), (4, 1), (30, 2), (120, 10), (600, 50), (1000, 50),
                                              (1001, 100), (25_000, 2000)])
def test_line_cadence_is_a_round_twentieth_of_the_run(total, every):
    assert line_every(total) == every


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_the_first_step_every_n_steps_and_the_last(tmp_path):
    """100 steps resumed at step 37, a line every 10: steps 38 (the first of this process), 40, 50, ..., 100;
    each line's loss is the mean since the previous one, and the rate leaves the first step's warm-up out."""
    stream, clock = io.StringIO(), FakeClock()
    progress = LineProgress(total=100, initial=37, every=10, stream=stream, clock=clock)
    for step in range(38, 101):
        clock.now += 30.0 if step == 38 else 0.5  # a slow first step, then 2 steps/s
        progress.step(loss=float(step), lr=1e-4, grad_norm=0.25)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [38, 40, 50, 60, 70, 80, 90, 100]
    assert "\r" not in stream.getvalue()
    assert "loss 38.0000 (mean of 1)" in lines[0] and "first step 30.00 s" in lines[0]
    assert "loss 39.5000 (mean of 2)" in lines[1] and "loss 45.5000 (mean of 10)" in lines[2]
    assert "2.00 step/s" in lines[2] and "eta 0:00:25" in lines[2] and "elapsed 0:00:36" in lines[2]
    assert "lr 1.00e-04  grad_norm 0.250" in lines[-1] and "eta 0:00:00" in lines[-1]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar_anything_else_lines():
    assert isinstance(step_progress(10, 0, enabled=True, stream=io.StringIO()), LineProgress)
    bar = step_progress(10, 0, enabled=True, stream=FakeTerminal())
    assert isinstance(bar, BarProgress)
    bar.close()
    off = step_progress(10, 0, enabled=False, stream=io.StringIO())
    assert isinstance(off, BarProgress) and off.bar.disable
    off.close()


def test_prepare_progress_lines_on_a_non_terminal():
    stream = io.StringIO()
    assert list(iter_progress(iter(range(40)), 40, "prepare", "item", enabled=True, stream=stream)) == list(range(40))
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{n}/40" for n in range(2, 41, 2)]
    assert list(iter_progress(range(3), 3, "prepare", "item", enabled=False, stream=stream)) == [0, 1, 2]
    assert len(stream.getvalue().splitlines()) == 20


# --- the start-of-run banner ------------------------------------------------------------------------


def test_banner_says_each_fact_once():
    """Two ranks under fsdp in bf16 with `auto` checkpointing: the strategy's reason (check_run's
    strategy_choice) and the fast path's report (fastcog.build's lines) become rows."""
    from fastcog.banner import RunStart, banner
    from fastcog.config import config_from_dict
    from fastcog.data.buckets import BucketBatchSampler

    cfg = config_from_dict({
        "model": {"path": "/models/x", "dtype": "bf16"},
        "data": {"data_root": "/data", "buckets": [[9, 64, 96], [9, 96, 64]]},
        "train": {"batch_size": 1, "gradient_accumulation_steps": 2, "train_steps": 30,
                  "activation_checkpointing": "auto"},
        "fast": {"attention": "sdpa"},
    })
    sampler = BucketBatchSampler([0, 0, 0, 1, 1], 1, 0, rank=0, world_size=2)
    lines = banner(RunStart(
        cfg, "cogvideox-5b", sampler, [(9, 64, 96), (9, 96, 64)], steps=30, start_step=10,
        resumed_from=Path("/runs/a/checkpoint-10"), trainable=1_234_567, world_size=2, strategy="fsdp",
        device=torch.device("cpu"), strategy_choice="auto chose fsdp: it fits",
        build_lines=["attention: sdpa (requested)", "activation checkpointing: auto chose selective; peaks ..."]))
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert lines[0] == "fastcog train: cogvideox-5b from /models/x"
    assert list(rows) == ["data", "buckets", "trainable", "steps", "precision", "parallel", "attention",
                          "checkpointing"]
    assert "each of 2 rank(s) trains 3 samples per epoch" in rows["data"]
    assert rows["buckets"] == "9x64x96: 3, 9x96x64: 2 samples (frames x height x width)"
    assert rows["trainable"].startswith("1.23 M parameters (LoRA rank 128, alpha 64 on to_q")
    assert rows["steps"] == ("30 in total, 1.5 per epoch (20 epochs); global batch 4 = 1 per rank x 2 rank(s) x 2 "
                             "accumulated; resuming at step 10 from /runs/a/checkpoint-10")
    assert "bf16 autocast" in rows["precision"]
    assert rows["parallel"] == "fsdp over 2 ranks on cpu; auto chose fsdp: it fits"
    assert rows["attention"] == "sdpa (requested)"
    assert rows["checkpointing"] == "auto chose selective; peaks ..."
    assert "warning" not in "\n".join(lines)
