"""Stopping on a signal loses nothing: the step in progress finishes, a checkpoint of it is
written, the CLI exits with EXIT_PREEMPTED, and resuming continues exactly (fastcog.stop). The
2-rank case is in test_two_ranks.py.

The signal is real (os.kill of this process) and is sent while the chosen step runs: the test
wraps fastcog.trainer.train_step, the one call per optimizer step, and the run goes through
`fastcog.cli.main` as `fastcog train` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fastcog.trainer
from fastcog.checkpoint import list_checkpoints
from fastcog.cli import main
from fastcog.config import save_config
from fastcog.stop import DUPLICATE_WINDOW_S, EXIT_PREEMPTED
from tests.runs import make_cfg, read_metrics

STEPS = 6


def signal_during_step(monkeypatch, step: int, signums: tuple[int, ...]) -> None:
    """Send `signums` to this process while optimizer step `step` (1-based, this process) runs."""
    real, calls = fastcog.trainer.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastcog.trainer, "train_step", train_step)


def config_file(tiny_checkpoint, clips, out: Path, **sections) -> str:
    cfg = make_cfg(tiny_checkpoint("cogvideox-5b"), clips, out, train={"train_steps": STEPS, "batch_size": 1},
                   checkpoint={"every_steps": 4, "resume_from": "latest"}, **sections)
    path = out.parent / f"{out.name}.yaml"
    save_config(cfg, path)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, clips, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", config_file(tiny_checkpoint, clips, out)]) == 0
    return [row["loss"] for row in read_metrics(out)]


def test_sigterm_saves_the_step_and_the_resume_is_exact(tiny_checkpoint, clips, tmp_path, monkeypatch, capsys,
                                                        uninterrupted):
    out = tmp_path / "run"
    cfg = config_file(tiny_checkpoint, clips, out)
    signal_during_step(monkeypatch, 3, (signal.SIGTERM,))
    assert main(["train", cfg]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and f"stopped on SIGTERM after step 3: checkpoint-3 is in {out}" in err
    # Step 3 is no checkpoint step (every 4): the stop wrote it, and nothing after it ran.
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert not (out / "lora").exists()  # not finished: nothing exported

    monkeypatch.undo()
    assert main(["train", cfg]) == 0
    assert [r["loss"] for r in read_metrics(out)] == uninterrupted  # bit for bit, steps 4..6 included
    assert (out / "lora").is_dir()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_stop_the_same_way(tiny_checkpoint, clips, tmp_path, monkeypatch, capsys, signum):
    out = tmp_path / "run"
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT when pytest runs as a background job
    signal_during_step(monkeypatch, 2, (signum,))
    assert main(["train", config_file(tiny_checkpoint, clips, out, data={"num_workers": 1})]) == EXIT_PREEMPTED
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert f"stopped on {signal.Signals(signum).name} after step 2" in capsys.readouterr().err
    # The handlers are this run's only: afterwards the signal does what it did before.
    assert signal.getsignal(signum) is before


def test_a_stop_on_a_checkpoint_step_writes_it_once(tiny_checkpoint, clips, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_during_step(monkeypatch, 4, (signal.SIGTERM,))
    assert main(["train", config_file(tiny_checkpoint, clips, out)]) == EXIT_PREEMPTED
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert "checkpoint-4" in capsys.readouterr().err


def run_two_signals(window_s: float) -> subprocess.CompletedProcess:
    code = (
        "import os, signal\n"
        "from fastcog.stop import StopRequest\n"
        f"stop = StopRequest(duplicate_window_s={window_s})\n"
        "with stop.handling():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('first: flagged', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('still running, stop requested by', stop.signal_name, flush=True)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_second_signal_exits_at_once():
    """The second signal takes the signal's default action: the process dies of it, then and there."""
    done = run_two_signals(window_s=0.0)
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == "first: flagged\n"
    assert "second signal (SIGTERM): exiting now" in done.stderr


def test_the_same_signal_delivered_twice_at_once_is_one_request():
    """A scheduler signals every process of the job and torchrun forwards it too: a repeat within the
    duplicate window (1 s) is not a second request."""
    done = run_two_signals(window_s=DUPLICATE_WINDOW_S)
    assert done.returncode == 0
    assert done.stdout == "first: flagged\nstill running, stop requested by SIGTERM\n"
    assert done.stderr.count("SIGTERM received") == 1

