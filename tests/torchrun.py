"""torchrun on CPU with gloo for the tests: the shared config, launches, and several runs in one launch.

Every launch starts the launcher and one Python per rank, each importing torch, diffusers and peft
(about 5 s on a 2-core machine before any work). Runs that need nothing but a process group of
the same size therefore share one launch: `launch_many` starts this module as the torchrun worker
(``python -m tests.torchrun``), which trains the given configs one after another in the same process
group, as `fastcog train` would one each (or calls a test's own distributed worker function), and
records per run what `fastcog train` would print and whether it raised a FastcogError (printed as
`fastcog: error: ...`, the run's status 2).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
STEPS = 12  # raw_config's train_steps


def raw_config(data: dict[str, str], out: Path, ranks: int = 1, global_batch: int = 2, **sections) -> dict:
    """The shared config: batch_size = global_batch / ranks, accumulation 2, clipping active."""
    raw = {
        "model": {"path": data["model"], "dtype": "fp32"},
        "data": {"data_root": data["clips"], "num_frames": 9, "height": 64, "width": 96, "cache_dir": data["cache"]},
        "lora": {"rank": 4, "alpha": 8},
        # lr_scheduler constant_with_warmup: the LR of a step does not depend on train_steps.
        "optim": {"lr": 1e-3, "lr_warmup_steps": 2, "max_grad_norm": 0.002},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": global_batch // ranks,
                  "gradient_accumulation_steps": 2, "train_steps": STEPS, "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 4, "limit": None},
        "log": {"report_to": "none", "progress_bar": False, "plot": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def in_process(raw: dict):
    from fastcog.config import config_from_dict, validate
    from fastcog.trainer import train

    cfg = config_from_dict(raw)
    validate(cfg)
    return train(cfg)


def torchrun_command(cfg_path: Path, nproc: int, script: list[str] | None = None) -> list[str]:
    # --standalone: a rendezvous on a free local port, so concurrent launches never collide.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + (script or ["-m", "fastcog"]) + ["train", str(cfg_path)]


def write_config(raw: dict, name: str) -> Path:
    path = Path(raw["train"]["output_dir"]).parent / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@functools.cache
def _vector_isa_probe_done() -> dict[str, str]:
    """TORCHINDUCTOR_VEC_ISA_OK=1 where this process found every vector ISA the CPU reports usable.

    Before its first C++ kernel, inductor probes each ISA the CPU reports (x86: avx2, avx512, ...) by
    building and loading a test program, cached in its TORCHINDUCTOR_CACHE_DIR. The launches that compile
    (the torchao low-bit optimizers' steps) each have a fresh one (conftest.py), so each would build them
    all again, ~6-8 s of a 2-core machine per launch, to reach the answer this process reaches from its
    own cache (~2 s, once per session, in the background launches' thread, where start_many is called).
    When that answer is "every reported ISA works", the launches are told to take the CPU's report as it
    is, which then picks the same ISA; on any other answer, or another architecture, they probe as before."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or "TORCHINDUCTOR_VEC_ISA_OK" in os.environ:
        return {}
    try:
        from torch._inductor import cpu_vec_isa

        flags = cpu_vec_isa.x86_isa_checker()
        reported = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        usable = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    except Exception:  # noqa: BLE001 -- another torch: the launches probe as they would anyway
        return {}
    return {"TORCHINDUCTOR_VEC_ISA_OK": "1"} if reported and reported == usable else {}


def launch(raw: dict, name: str, nproc: int = 2, script: list[str] | None = None,
           succeed: bool = True) -> subprocess.CompletedProcess:
    cfg_path = write_config(raw, name)
    done = subprocess.run(torchrun_command(cfg_path, nproc, script), capture_output=True, text=True, env=env(),
                          timeout=LAUNCH_TIMEOUT_S)
    if succeed:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@dataclass
class Outcome:
    """What one run of a shared launch printed (rank 0), its status (0 done, 2 a FastcogError) and how
    long it took (rank 0's wall clock, up to the barrier that ends it)."""

    status: int
    stdout: str
    stderr: str
    seconds: float = 0.0


@dataclass
class Call:
    """A run of a shared launch that is not `fastcog train`: `module:function`(*args) on every rank, in the
    launch's process group (the function must leave the group up)."""

    target: str
    args: list[str]


@dataclass
class Launch:
    """A shared launch started by `start_many`; `wait()` gives each run's Outcome by name."""

    proc: subprocess.Popen
    names: list[str]
    workdir: Path
    deadline: float  # time.monotonic() by which the launch must have ended

    def wait(self) -> dict[str, Outcome]:
        try:
            code = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        finally:
            self.stop()
        logs = {name: (self.workdir / f"launch.{name}").read_text(errors="replace") for name in ("stdout", "stderr")}
        assert code == 0, logs["stdout"][-2000:] + logs["stderr"][-4000:]
        outcomes = json.loads((self.workdir / "outcomes.json").read_text())
        assert list(outcomes) == self.names
        return {name: Outcome(**o) for name, o in outcomes.items()}

    def stop(self) -> None:
        """End the launch, ranks included (its own process group), if it is still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_many(runs: dict[str, dict | Call], workdir: Path, nproc: int = 2, cpu_only: bool = False,
               background: bool = False, env_vars: dict[str, str] | None = None) -> Launch:
    """Start `runs` (name -> raw config to train, or a Call), in this order, in one torchrun launch, and
    return without waiting. cpu_only: CPU and gloo even where a GPU is visible. background: at the
    lowest scheduling priority (SCHED_IDLE where `chrt` is there, else nice 19), for a launch that runs
    beside other tests. env_vars: set for the launch.

    A run may resume from an earlier one's checkpoint (checkpoint.resume_from set to its path). A run
    that raises a FastcogError is recorded with status 2 and the launch goes on; anything else ends it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    plan = [{"name": name, "call": run.target, "args": run.args} if isinstance(run, Call)
            else {"name": name, "config": str(write_config(run, name))} for name, run in runs.items()]
    (workdir / "plan.json").write_text(json.dumps(plan, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tests.torchrun", str(workdir / "plan.json"), str(workdir / "outcomes.json")]
    if background:
        cmd = ["chrt", "--idle", "0", *cmd] if shutil.which("chrt") else ["nice", "-n", "19", *cmd]
    # As a module from the repository root: run as a file, its folder tests/ would be on sys.path and
    # tests/kernels would shadow the PyPI package `kernels` that transformers imports.
    run_env = {**env(), **_vector_isa_probe_done(), **({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {}),
               **(env_vars or {})}
    with open(workdir / "launch.stdout", "w") as out, open(workdir / "launch.stderr", "w") as err:
        # Its own process group, for `Launch.stop` to end the ranks with the launcher; not a session of its
        # own, which would be scheduled as a group of its own (autogroup), beside this one, whatever its nice.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=run_env, cwd=ROOT, process_group=0)
    return Launch(proc, list(runs), workdir, time.monotonic() + LAUNCH_TIMEOUT_S * max(1, len(runs) // 2))


class Background:
    """Launches run one after another, each started when the one before has ended, in a thread of its
    own while the tests go on; `submit` takes start_many's arguments and gives a Future of the
    launch's outcomes (Launch.wait's)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._current: Launch | None = None
        self._closed = False

    def submit(self, runs: dict[str, dict | Call], workdir: Path, **kwargs) -> Future:
        def run() -> dict[str, Outcome]:
            if self._closed:
                raise RuntimeError("background launches closed")
            self._current = start_many(runs, workdir, **kwargs)
            return self._current.wait()

        return self._pool.submit(run)

    def close(self) -> None:
        """Cancel the launches not started, and end the one running."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._current is not None:
            self._current.stop()


def launch_many(runs: dict[str, dict | Call], workdir: Path, nproc: int = 2, cpu_only: bool = False
                ) -> dict[str, Outcome]:
    """`start_many` and wait: each run's Outcome by name."""
    return start_many(runs, workdir, nproc, cpu_only).wait()


def _run_plan(plan_path: str, report: str) -> None:
    """The worker of `launch_many`: each config as `fastcog train` runs it, one process group for all."""
    import importlib

    from fastcog.cli import _quiet_libraries
    from fastcog.config import load_config
    from fastcog.errors import FastcogError
    from fastcog.parallel import barrier, current_world, init_distributed, shutdown_distributed
    from fastcog.trainer import train

    _quiet_libraries()
    init_distributed()
    outcomes = {}
    for run in json.loads(Path(plan_path).read_text()):
        out, err, status, start = io.StringIO(), io.StringIO(), 0, time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if "call" in run:
                    module, function = run["call"].split(":")
                    getattr(importlib.import_module(module), function)(*run["args"])
                else:
                    summary = train(load_config(run["config"]))
                    if current_world().is_main:
                        print("\n".join(summary.lines()))
            except FastcogError as error:
                print(f"fastcog: error: {error}", file=sys.stderr)
                status = 2
        barrier()  # every rank has finished the run before the next starts
        outcomes[run["name"]] = {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(),
                                 "seconds": round(time.monotonic() - start, 2)}
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
    if current_world().is_main:
        Path(report).write_text(json.dumps(outcomes, indent=1))
    shutdown_distributed()


# test_distributed's HSDP run: a 2 x 2 mesh (replicate x shard), activation checkpointing in each
# sharded block, 4 ranks x batch 1 (one process x batch 4 is its reference).
HSDP_SECTIONS = {"train": {"train_steps": 2, "activation_checkpointing": "full"}, "checkpoint": {"every_steps": 0}}


def hsdp_config(data: dict[str, str], out: Path) -> dict:
    return raw_config(data, out, ranks=4, global_batch=4, parallel={"replicate_degree": 2}, **HSDP_SECTIONS)


def metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out: str | Path) -> list[float]:
    return [row["loss"] for row in metrics(out)]


def assert_losses_close(got: list[float], want: list[float], rtol: float) -> None:
    assert len(got) == len(want) and len(got) > 0
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"{len(got)} steps, largest relative loss difference {worst:.1e} (tolerance {rtol:.0e})")
    assert worst <= rtol, f"largest relative loss difference {worst:.2e} > {rtol:.0e}:\n{got}\n{want}"


if __name__ == "__main__":  # the torchrun worker of launch_many: plan.json outcomes.json
    _run_plan(sys.argv[1], sys.argv[2])
