"""docs/slurm_train.sh under stand-ins for SLURM's commands: the time-limit signal reaches every
worker as TERM, the job is requeued to resume, and a job that ends on its own is not requeued.

The stand-in `srun` records its arguments, tells the test it is running (through a FIFO, so the
test waits for exactly that), and runs until it receives TERM, which it answers as fastcog does
(status 75). `scancel --signal=TERM` sends TERM to it; `scontrol` records requeues.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "slurm_train.sh"

STUBS = {
    "srun": """#!/bin/bash
echo "$@" > "$FAKE/srun.args"
trap 'echo TERM >> "$FAKE/srun.signals"; exit 75' TERM
echo $$ > "$FAKE/srun.pid"
echo running > "$FAKE/ready"
[ -n "$FAKE_SRUN_EXIT" ] && exit "$FAKE_SRUN_EXIT"
while true; do sleep 0.05; done
""",
    "scancel": """#!/bin/bash
echo "$@" >> "$FAKE/scancel.calls"
kill -TERM "$(cat "$FAKE/srun.pid")"
""",
    "scontrol": """#!/bin/bash
if [ "$1" = show ]; then echo node1; else echo "$@" >> "$FAKE/scontrol.calls"; fi
""",
}


@pytest.fixture(autouse=True)
def no_stand_in_left(tmp_path):
    """A failing case may leave the stand-in srun running: end it."""
    yield
    pid = tmp_path / "srun.pid"
    if pid.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGKILL)


def start(tmp_path: Path, **env: str) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    os.mkfifo(tmp_path / "ready")
    return subprocess.Popen(
        ["bash", str(SCRIPT), "configs/t2v_h100.yaml", "--set", "train.output_dir=/scratch/run"],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path),
             "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_GPUS_ON_NODE": "8", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_script_asks_for_a_signal_before_the_time_limit():
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text


def test_the_time_limit_signal_checkpoints_every_worker_and_requeues(tmp_path):
    job = start(tmp_path)
    assert (tmp_path / "ready").read_text() == "running\n"  # blocks until srun runs
    args = (tmp_path / "srun.args").read_text().split()
    assert args[args.index("-m"):] == ["-m", "fastcog", "train", "configs/t2v_h100.yaml",
                                       "--set", "parallel.replicate_degree=1", "--set", "checkpoint.resume_from=latest",
                                       "--set", "train.output_dir=/scratch/run"]
    job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell 300 s before the limit
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert (tmp_path / "scancel.calls").read_text() == "--signal=TERM 123\n"
    assert (tmp_path / "srun.signals").read_text() == "TERM\n"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 123\n"
    assert "stopped with a checkpoint (status 75): requeueing job 123" in err


def test_a_run_that_ends_by_itself_is_not_requeued(tmp_path):
    job = start(tmp_path, FAKE_SRUN_EXIT="2")
    assert (tmp_path / "ready").read_text() == "running\n"
    job.communicate(timeout=60)
    assert job.returncode == 2  # the run's own status
    assert not (tmp_path / "scontrol.calls").exists() and not (tmp_path / "scancel.calls").exists()
