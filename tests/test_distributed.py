"""torchrun on CPU with gloo: the losses of one process, checkpoints across world sizes, a dead rank.

Every comparison is 2 ranks x batch 1 against 1 process x batch 2 (the same global batch),
with gradient accumulation 2 and a clipping norm below the gradient norm, so gradient sync on
the last micro-batch only and the global-norm clip are both on the path being compared.

Tolerances. fp32: the same samples, timesteps and noise reach the same model, but one
process computes them as one batch-2 GEMM where two ranks compute two batch-1 GEMMs, and the
gradient is summed in another order (reduce-scatter); fp32 rounding then differs at ~1e-7 per
op and the per-step losses agree to ~1e-8 relative (measured). 1e-6 relative leaves room for
a drift over 12 steps, yet a wrong gradient (say a missing average over ranks, or a clip by
one shard's norm) moves the loss at the 1e-4 level from step 2 on. bf16 (FSDP casts the
fp32 adapters to bf16 before the matmul, one process lets autocast do it inside; measured
5e-5): 1e-3 relative.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcog.checkpoint import list_checkpoints, load_checkpoint, read_trainable
from fastcog.config import ParallelConfig
from fastcog.errors import ConfigError, FastcogError
from fastcog.parallel import World, check_optimizer, resolve_strategy
from tests.distributed_runs import BF16, PRODIGY, SFT, TORCHAO_LOW_BIT
from tests.torchrun import (
    HSDP_SECTIONS,
    LAUNCH_TIMEOUT_S,
    STEPS,
    assert_losses_close,
    env,
    in_process,
    losses,
    metrics,
    raw_config,
    torchrun_command,
    write_config,
)

FP32_RTOL = 1e-6
BF16_RTOL = 1e-3


@pytest.fixture(scope="module")
def data(torchrun_data) -> dict[str, str]:
    """The tiny 5B model, the session's clips and their cache (conftest.py)."""
    return torchrun_data


@pytest.fixture(scope="module")
def two_rank_runs(two_rank_launch) -> dict:
    """This module's runs of the suite's shared 2-rank launch (conftest.py; tests/distributed_runs.py's
    two_rank_plan, each run in the folder named after it): name -> (output folder, Outcome)."""
    root, outcomes = two_rank_launch["distributed"]
    return {name: (root / name, outcome) for name, outcome in outcomes.items()}


def two_rank_run(runs: dict, name: str) -> Path:
    """The output folder of a run of the shared launch, which must have finished."""
    out, outcome = runs[name]
    assert outcome.status == 0, outcome.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(two_rank_runs) -> Path:
    return two_rank_run(two_rank_runs, "two_ranks")


def test_two_ranks_give_the_losses_of_one(one_rank, two_ranks):
    ref, got = metrics(one_rank), metrics(two_ranks)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    assert_losses_close([r["loss"] for r in got], [r["loss"] for r in ref], FP32_RTOL)
    # The pre-clip norm is the norm over both ranks' shards (each shard alone is smaller), and
    # above max_grad_norm: every step was clipped by it.
    for r, g in zip(ref, got):
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
        assert g["grad_norm"] > 0.002
        # Throughput counts the global batch: the same tokens per sample as one process.
        assert g["tokens_per_s"] / g["samples_per_s"] == pytest.approx(r["tokens_per_s"] / r["samples_per_s"])
    assert [s for s, _ in list_checkpoints(two_ranks)] == [4, 8, 12]  # async saves all completed
    assert not list(two_ranks.glob(".tmp-checkpoint-*"))


def test_exported_lora_of_two_ranks_equals_one(one_rank, two_ranks):
    from safetensors import safe_open

    files = [out / "lora" / "pytorch_lora_weights.safetensors" for out in (one_rank, two_ranks)]
    tensors, meta = [], []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            tensors.append({k: h.get_tensor(k) for k in h.keys()})
            meta.append(h.metadata())
    assert meta[0] == meta[1] and "lora_adapter_metadata" in json.dumps(meta[0])  # alpha travels along
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 0
    for key, want in tensors[0].items():
        # fp32 Adam with lr 1e-3 over 12 steps: the weights agree to the last few ulps of their
        # updates (atol 1e-6 on weights ~1e-1, updates ~1e-2).
        torch.testing.assert_close(tensors[1][key], want, rtol=1e-5, atol=1e-6, msg=key)
    # The last checkpoint (shards of both ranks, read whole) holds exactly the exported weights.
    ck = read_trainable(two_ranks / "checkpoint-12")
    exported = {"transformer." + name.replace(".default", ""): value for name, value in ck.items()}
    assert exported.keys() == tensors[1].keys()
    assert all(torch.equal(exported[k], tensors[1][k]) for k in exported)


def test_checkpoint_of_two_ranks_resumes_on_one(data, one_rank, two_ranks, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(two_ranks / "checkpoint-4", out / "checkpoint-4")
    summary = in_process(raw_config(data, out, checkpoint={"resume_from": "latest"}))
    assert summary.resumed_from == out / "checkpoint-4"
    assert_losses_close(summary.losses, losses(one_rank)[4:], FP32_RTOL)


def test_checkpoint_of_one_rank_resumes_on_two(one_rank, two_rank_runs):
    out, outcome = two_rank_runs["resume_on_two"]
    two_rank_run(two_rank_runs, "resume_on_two")
    assert "resumed from" in outcome.stdout and "processes      2 (fsdp)" in outcome.stdout
    assert [r["step"] for r in metrics(out)] == list(range(5, STEPS + 1))
    assert_losses_close(losses(out), losses(one_rank)[4:], FP32_RTOL)


def test_ddp_gives_the_losses_of_one(one_rank, two_rank_runs):
    """parallel.strategy=ddp: 2 ranks at batch 1 train what one process trains at batch 2."""
    out = two_rank_run(two_rank_runs, "ddp")
    assert "processes      2 (ddp)" in two_rank_runs["ddp"][1].stdout
    assert_losses_close(losses(out), losses(one_rank)[:6], FP32_RTOL)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_fastcog_script_is_installed_and_runs():
    """The console script the README and torchrun launch (`torchrun ... $(which fastcog) train`)."""
    script = shutil.which("fastcog", path=str(Path(sys.executable).parent))
    assert script is not None, "the fastcog console script is not installed next to this python"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("fastcog "), done.stderr


def test_bf16_lora_under_fsdp(data, two_rank_runs, tmp_path):
    """Frozen bf16 base and fp32 adapters in one FSDP unit, parameters cast to bf16 for compute."""
    ref = in_process(raw_config(data, tmp_path / "one", **BF16))
    assert_losses_close(losses(two_rank_run(two_rank_runs, "bf16")), ref.losses, BF16_RTOL)


def test_prodigy_refused_under_fsdp_and_equal_to_one_process_under_ddp(data, two_rank_runs, tmp_path):
    """Prodigy's step size D comes from sums over every trained value. Under FSDP prodigyopt would sum
    each rank's shards alone (see fastcog.parallel.PRODIGY_UNDER_FSDP), so fastcog refuses it before
    any work; under DDP, the way out it names, 2 ranks train what one process trains.

    The losses cannot tell a wrong D here: Prodigy starts at D = 1e-6 and its 12 steps move the loss
    ~1e-9 relative whatever D is (with per-rank D under FSDP they still agree to 5e-9, measured).
    LoRA B starts at zero, so the exported B is the sum of the steps and scales with D. Measured over
    5-6 variations of the tiny setup, as max |difference| / max |B| of a tensor:
    DDP 6.5e-7 to 4.3e-6; FSDP with per-rank D (the refusal taken out) 6.8e-3 to 3.9e-2. The
    tolerance, 1e-4, sits 23x above the first and 68x below the second.
    """
    from safetensors.torch import load_file

    out, refused = two_rank_runs["prodigy_fsdp"]
    assert refused.status == 2  # a FastcogError, as `fastcog train` reports it
    assert "optim.name='prodigy' cannot run under FSDP" in refused.stderr and "parallel.strategy=ddp" in refused.stderr
    assert not out.exists()  # refused before the output folder was made

    ref = in_process(raw_config(data, tmp_path / "one", **PRODIGY))
    ddp = two_rank_run(two_rank_runs, "prodigy_ddp")
    assert_losses_close(losses(ddp), ref.losses, FP32_RTOL)
    want, got = (load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")) for run in (tmp_path / "one", ddp))
    assert want.keys() == got.keys() and any(".lora_B." in key for key in want)
    worst = max(float((got[key] - w).abs().max() / w.abs().max()) for key, w in want.items())
    print(f"exported LoRA: largest difference {worst:.1e} of the tensor's largest value")
    assert worst <= 1e-4, worst  # measured up to 4.3e-6; a per-rank D gives >= 6.8e-3


def test_torchao_low_bit_optimizers_under_fsdp_equal_one_process(two_rank_runs, low_bit_references):
    """adamw_fp8, adamw8bit, adamw4bit (torchao) on 2 FSDP ranks train what one process trains.

    LoRA rank 256: each rank's shard of a LoRA tensor (inner dim 32) then holds 4096 values, the least
    torchao quantises (smaller ones keep fp32 states), and is whole quantisation blocks (256 or 128
    values) of the tensor, so both runs quantise the same blocks. At rank 128 the shards keep fp32
    states where one process quantises, and the losses differ by 3.0e-7 (measured). The three runs
    share one fresh TORCHINDUCTOR_CACHE_DIR in this order, in the one-process references (conftest.py's
    low_bit_references, a process of their own) and in the 2-rank launch:
    adamw8bit finds adamw_fp8's compiled step there, under the same cache key
    (fastcog.optim._without_autograd_cache); with that cache in use it ran that step on its 8-bit
    codes without an error (losses 2.5e-7 off, LoRA 2.7e-2 off in the measure below), and adamw4bit
    crashed.

    Measured over 3 seeds x 3 optimizers. Low-bit states turn the ~1e-7 rounding differences of two
    ranks into a few flipped codes, which move single values (max |difference| / max |B| of a tensor
    up to 1.3e-1 for FSDP and DDP alike, where a 1% larger lr gives 2.5e-1), so the LoRA is compared by
    mean |difference| / mean |B| of each B tensor (B starts at zero: it is what training wrote):
      largest relative loss difference    FSDP 3.4e-9 to 7.0e-9 (DDP 3.3e-9 to 7.4e-9, fp32 adamw under
                                          FSDP 3.7e-9 to 6.6e-9); lr 1% larger 5.3e-6 to 8.6e-6
      worst B, mean |diff| / mean |B|     FSDP 1.6e-6 to 4.5e-5 (DDP 2.0e-6 to 4.5e-5, fp32 adamw under
                                          FSDP 1.8e-7 to 2.0e-7); lr 1% larger 1.0e-2; fp32 states
                                          (adamw) instead of low-bit 1.2e-2 to 2.8e-1
    Tolerances: losses 1e-7 (14x above, 53x below), LoRA 5e-4 (11x above, 20x below).
    """
    from safetensors.torch import load_file

    def worst_b(run: Path, ref: Path) -> float:
        got, want = (load_file(str(r / "lora" / "pytorch_lora_weights.safetensors")) for r in (run, ref))
        keys = [key for key in want if ".lora_B." in key]
        assert keys and got.keys() == want.keys()
        return max(float((got[k] - want[k]).abs().mean() / want[k].abs().mean()) for k in keys)

    refs = low_bit_references
    for name in TORCHAO_LOW_BIT:
        # The states were quantised: fp32 states train measurably otherwise (measured 1.2e-2 to 2.8e-1),
        # so FSDP keeping fp32 states on its shards would fail the comparison below.
        assert worst_b(refs / name, refs / "adamw") > 5e-3, name
        fsdp = two_rank_run(two_rank_runs, f"{name}_fsdp")
        assert_losses_close(losses(fsdp), losses(refs / name), 1e-7)
        worst = worst_b(fsdp, refs / name)
        print(f"{name}: exported LoRA B, worst mean |difference| / mean |B| {worst:.1e}")
        assert worst <= 5e-4, (name, worst)

    # Sharded 4-bit states go through a checkpoint whole: 2 ranks resumed at step 6 (from the run's
    # checkpoint-6, by path) retrace steps 7-12 bit for bit. With the optimizer state left out of
    # load_checkpoint's dcp.load, the second resumed step's loss differs (1.0905571 against 1.0905008).
    fsdp, resumed = two_rank_run(two_rank_runs, "adamw4bit_fsdp"), two_rank_run(two_rank_runs, "adamw4bit_resumed")
    assert [r["step"] for r in metrics(resumed)] == list(range(7, STEPS + 1))
    assert losses(resumed) == losses(fsdp)[6:]
    assert worst_b(resumed, fsdp) == 0.0


def test_hsdp_on_four_ranks(data, four_rank_runs, tmp_path):
    """parallel.replicate_degree=2: a 2 x 2 mesh (replicate x shard), with activation checkpointing
    inside each sharded block; 4 ranks x batch 1 (in the suite's 4-rank launch, conftest.py) against
    one process x batch 4."""
    ref = in_process(raw_config(data, tmp_path / "one", global_batch=4, **HSDP_SECTIONS))
    out, outcome = four_rank_runs["hsdp"]
    assert outcome.status == 0 and "processes      4 (fsdp)" in outcome.stdout, outcome.stderr[-3000:]
    assert_losses_close(losses(out), ref.losses, FP32_RTOL)


def test_full_finetune_under_fsdp(data, two_rank_runs, tmp_path):
    """SFT: every weight (and its Adam state) sharded; the export is a whole diffusers transformer."""
    from diffusers import CogVideoXTransformer3DModel

    ref = in_process(raw_config(data, tmp_path / "one", **SFT))
    two = two_rank_run(two_rank_runs, "sft")
    assert_losses_close(losses(two), ref.losses, FP32_RTOL)
    # Each rank wrote its own half of the weights and Adam state (replicated tensors would be
    # written once, by rank 0): the optimizer state is sharded.
    sizes = [f.stat().st_size for f in sorted((two / "checkpoint-3").glob("__*_0.distcp"))]
    assert len(sizes) == 2 and min(sizes) > 0.4 * sum(sizes), sizes
    one_model = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "one" / "transformer")
    two_model = CogVideoXTransformer3DModel.from_pretrained(two / "transformer")
    base = CogVideoXTransformer3DModel.from_pretrained(data["model"], subfolder="transformer")
    changed = 0
    pairs = zip(one_model.named_parameters(), two_model.named_parameters(), base.named_parameters())
    for (name, a), (_, b), (_, c) in pairs:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        changed += not torch.equal(a, c)
    assert changed > 10


def child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` (a direct child of the launcher), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a process that ended while we looked
    return None


def signal_rank_1_after_checkpoint_2(raw: dict, sig: signal.Signals, log_path: Path, bound_s: float,
                                     continue_once_logged: str | None = None) -> tuple[int, float]:
    """Start a 2-rank job, wait (polling) until checkpoint-2 is whole, send `sig` to rank 1; with
    `continue_once_logged`, SIGCONT rank 1 once that text is in the job's log.

    Returns torchrun's exit code and the seconds it took to exit after the signal. The job runs
    in its own process group, removed whatever happens.
    """
    out = Path(raw["train"]["output_dir"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun_command(write_config(raw, out.name), 2), stdout=log,
                                stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (out / "checkpoint-2" / "COMPLETE").is_file():
            assert time.monotonic() < deadline, "no checkpoint-2 in time"
            with pytest.raises(subprocess.TimeoutExpired):  # the job must still be running
                proc.wait(timeout=0.1)
        victim = child_with_rank(proc.pid, 1)
        assert victim is not None, "rank 1's process not found under the launcher"
        os.kill(victim, sig)
        sent = time.monotonic()
        while continue_once_logged and continue_once_logged not in log_path.read_text(errors="replace"):
            assert time.monotonic() < sent + bound_s, f"{continue_once_logged!r} not logged in time"
            with contextlib.suppress(subprocess.TimeoutExpired):
                if proc.wait(timeout=0.1) is not None:
                    break
        if continue_once_logged:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        code = proc.wait(timeout=bound_s)
        return code, time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):  # normally torchrun has ended them all already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_latest_checkpoint_resumes(data: dict[str, str], out: Path, one_rank: Path, tmp_path: Path) -> None:
    """The newest complete checkpoint loads on one rank and continues with the uninterrupted run's losses."""
    last, _ = list_checkpoints(out)[-1]
    upto = last + 2
    reference = losses(one_rank) if upto <= STEPS else in_process(
        raw_config(data, tmp_path / "reference", train={"train_steps": upto})).losses
    summary = in_process(raw_config(data, out, train={"train_steps": upto}, checkpoint={"resume_from": "latest"}))
    assert summary.resumed_from == out / f"checkpoint-{last}"
    assert_losses_close(summary.losses, reference[last:upto], FP32_RTOL)


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker pids in /proc (Linux)")


@LINUX_PROC
def test_killed_rank_ends_the_job_and_the_last_checkpoint_loads(data, one_rank, tmp_path):
    """SIGKILL on rank 1: torchrun sees its worker die, stops the other and exits non-zero."""
    out = tmp_path / "killed"
    raw = raw_config(data, out, ranks=2, train={"train_steps": 100_000}, checkpoint={"every_steps": 2, "limit": 2})
    code, took = signal_rank_1_after_checkpoint_2(raw, signal.SIGKILL, tmp_path / "torchrun.log", bound_s=120)
    print(f"torchrun exited with {code} {took:.1f} s after rank 1 was killed")
    assert code != 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    assert_latest_checkpoint_resumes(data, out, one_rank, tmp_path)


@LINUX_PROC
def test_stuck_rank_ends_the_job_after_the_timeout(data, one_rank, tmp_path):
    """SIGSTOP on rank 1 (alive, never answering): rank 0's next collective fails after
    parallel.timeout_s, and the job ends with an error.

    Rank 1 is continued (SIGCONT) once rank 0 has logged its timeout: a stopped process would hold
    torchrun's SIGTERM until torchrun's fixed 30 s grace period ends in a SIGKILL (the launcher's own
    behaviour, the same for any stuck worker), which is all this would add to the test's time."""
    out = tmp_path / "stuck"
    raw = raw_config(data, out, ranks=2, train={"train_steps": 100_000}, checkpoint={"every_steps": 2, "limit": 2},
                     parallel={"timeout_s": 3})
    code, took = signal_rank_1_after_checkpoint_2(raw, signal.SIGSTOP, tmp_path / "torchrun.log", bound_s=120,
                                                  continue_once_logged="Timed out")
    print(f"torchrun exited with {code} {took:.1f} s after rank 1 was stopped")
    assert code != 0
    assert took >= 3  # it was the timeout, not something else, that ended it
    assert "Timed out" in (tmp_path / "torchrun.log").read_text()
    assert_latest_checkpoint_resumes(data, out, one_rank, tmp_path)


# --------------------------------------------------------------------------------------------
# Without torchrun: what the world size decides, and checkpoint format errors
# --------------------------------------------------------------------------------------------


def test_strategy_follows_the_world_size():
    two, four = World(0, 2), World(0, 4)
    assert resolve_strategy(ParallelConfig(), World()) == "none"
    assert resolve_strategy(ParallelConfig(strategy="fsdp"), World()) == "none"
    assert resolve_strategy(ParallelConfig(), two) == "fsdp"
    assert resolve_strategy(ParallelConfig(strategy="ddp"), two) == "ddp"
    assert resolve_strategy(ParallelConfig(replicate_degree=2), four) == "fsdp"
    with pytest.raises(ConfigError, match="parallel.strategy=none"):
        resolve_strategy(ParallelConfig(strategy="none"), two)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_strategy(ParallelConfig(replicate_degree=3), four)
    with pytest.raises(ConfigError, match="needs parallel.strategy=fsdp"):
        resolve_strategy(ParallelConfig(strategy="ddp", replicate_degree=2), four)


def test_optimizers_that_cannot_step_shards_are_refused_under_fsdp():
    from fastcog.config import OptimConfig

    for name in ("came", "adamw8bit_bnb", "prodigy"):
        with pytest.raises(ConfigError, match="parallel.strategy=ddp"):
            check_optimizer(OptimConfig(name=name), "fsdp")
        check_optimizer(OptimConfig(name=name), "ddp")
    with pytest.raises(ConfigError, match="cpu_offload"):
        check_optimizer(OptimConfig(cpu_offload=True), "fsdp")
    check_optimizer(OptimConfig(name="adamw8bit"), "fsdp")


class StateOnlyWhole(torch.optim.Optimizer):
    """Shaped like torchao's CPUOffloadOptimizer: an Optimizer with no `state` of its own."""

    def __init__(self, params) -> None:  # Optimizer.__init__ deliberately not called, as torchao does
        self.inner = torch.optim.AdamW(params, lr=0.1)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def step(self, closure=None) -> None:
        self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)


def test_an_optimizer_without_named_state_is_saved_whole(tmp_path):
    from fastcog.checkpoint import Checkpointer, TrainState

    def setup(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = StateOnlyWhole(model.parameters())
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)

    model, opt, sched = setup(0)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    sched.step()
    Checkpointer(tmp_path, World()).save(TrainState(step=1), model, opt, sched)
    model2, opt2, sched2 = setup(1)
    assert load_checkpoint(tmp_path / "checkpoint-1", model2, opt2, sched2).step == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    want, got = opt.inner.state_dict()["state"], opt2.inner.state_dict()["state"]
    assert want.keys() == got.keys() and all(torch.equal(want[k]["exp_avg"], got[k]["exp_avg"]) for k in want)


def test_a_folder_without_dcp_metadata_is_refused(tmp_path):
    (tmp_path / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(FastcogError, match="not a torch.distributed.checkpoint folder"):
        load_checkpoint(tmp_path, torch.nn.Linear(2, 2), None, None)
    with pytest.raises(FastcogError, match="not a torch.distributed.checkpoint folder"):
        read_trainable(tmp_path)
