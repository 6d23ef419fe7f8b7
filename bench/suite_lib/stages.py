"""The suite's stages, in the order they run, each with its time cap and the commands it runs.

Order is importance: a cut run still returns what matters most. Each stage runs under
min(its cap, the time left before the summary's reserve), and is not started with less than
its minimum left (it could not finish: it is reported as skipped instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HEADLINE_VARIANT, HEADLINE_CONFIG = "cogvideox-5b", "configs/t2v_h100.yaml"
HEADLINE_SHAPE = ("49", "480", "720")  # frames, height, width: the reference trainer's 5B resolution
HEADLINE_STEPS, HEADLINE_WARMUP = 5, 2
ABLATION_STEPS = 3
SITE = "/tmp/site"
"""Where the setup stage installs carried wheels (pip --target); first on every later stage's PYTHONPATH."""
ABLATION_TAIL_S = 90
"""The ablation starts no new row in its last 90 s: one 5B row (build, compile, 2 + 3 steps) takes
about that long, so a row started later would be cut before it writes anything."""


@dataclass(frozen=True)
class Suite:
    """What every stage's commands are made from."""

    out: Path
    repo: Path
    python: list[str]
    """The interpreter command each stage runs (``sys.executable`` unless --python says otherwise)."""
    dry_run: bool
    """A CPU plumbing run: the tiny model, the CPU smoke modes, the GPU tests collected, not run."""
    ablation_rows: str


@dataclass
class Plan:
    """One stage's commands, or why it does not run."""

    commands: list[list[str]] = field(default_factory=list)
    skip: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    cap_s: float | None
    """At most this long (None: whatever is left)."""
    min_s: float
    """Not started with less than this left."""
    plan: Callable[[Suite], Plan]


def stage_dir(suite: Suite, name: str) -> Path:
    return suite.out / name


def throughput_json(suite: Suite, name: str) -> Path | None:
    """The throughput JSON a stage wrote (one per stage folder), if any."""
    files = sorted(stage_dir(suite, name).glob("throughput_*.json"))
    return files[-1] if files else None


def headline_reference(suite: Suite) -> tuple[Path | None, str | None]:
    """The headline's JSON if its reference path ran, else why the later stages cannot reuse it."""
    path = throughput_json(suite, "headline")
    if path is None:
        return None, "the headline wrote no results"
    paths = json.loads(path.read_text()).get("paths", [])
    if not paths or paths[0].get("status") != "ok":
        return None, "the headline's reference path did not run"
    return path, None


def throughput_command(suite: Suite, name: str, rows: str, *extra: str) -> list[str]:
    argv = [*suite.python, "bench/throughput.py", f"--rows={rows}", "--out-dir", str(stage_dir(suite, name)),
            "--variant", HEADLINE_VARIANT]
    if suite.dry_run:  # the benchmark's CPU setting on the tiny model (FP8 and compile need a GPU)
        argv += ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    else:
        frames, height, width = HEADLINE_SHAPE
        argv += ["--config", HEADLINE_CONFIG, "--frames", frames, "--height", height, "--width", width,
                 "--batch-size", "1", "--steps", str(HEADLINE_STEPS), "--warmup", str(HEADLINE_WARMUP)]
    return argv + list(extra)


def plan_setup(suite: Suite) -> Plan:
    commands = []
    for folder in ("wheels", ".whl"):
        wheels = sorted(str(p) for p in (suite.repo / folder).glob("*.whl"))
        if wheels and not suite.dry_run:  # a dry run uses this machine's packages as they are
            commands.append([*suite.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--upgrade", "--target", SITE, *wheels])
    record = stage_dir(suite, "setup") / "environment.json"
    commands.append([*suite.python, "bench/suite_lib/environment.py", str(record),
                     *([] if suite.dry_run else ["--require-cuda"])])
    return Plan(commands)


def plan_probe(suite: Suite) -> Plan:
    return Plan([[*suite.python, "bench/gpu_probe.py", "--out", str(stage_dir(suite, "probe")),
                  "--budget-s", "80", *(["--tiny"] if suite.dry_run else [])]])


def plan_headline(suite: Suite) -> Plan:
    return Plan([throughput_command(suite, "headline", "fastcog")])


def plan_selective(suite: Suite) -> Plan:
    reference, why = headline_reference(suite)
    if reference is None:
        return Plan(skip=why)
    return Plan([throughput_command(suite, "selective", "selective", "--reference-from", str(reference))])


def plan_kernels(suite: Suite) -> Plan:
    smoke = ["--smoke", "--compile-backend", "aot_eager"] if suite.dry_run else []
    return Plan([[*suite.python, "bench/kernel_bench.py", "--out", str(stage_dir(suite, "kernels")), *smoke]])


def plan_ablation(suite: Suite) -> Plan:
    reference, why = headline_reference(suite)
    if reference is None:
        return Plan(skip=why)
    # --max-seconds is filled in by the suite from the stage's timeout (see ABLATION_TAIL_S).
    return Plan([throughput_command(suite, "ablation", suite.ablation_rows, "--reference-from", str(reference),
                                    "--ablation-steps", "1" if suite.dry_run else str(ABLATION_STEPS))])


def plan_gputests(suite: Suite) -> Plan:
    junit = stage_dir(suite, "gputests") / "junit.xml"
    argv = [*suite.python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs", "-p", "no:cacheprovider",
            f"--junitxml={junit}"]
    if suite.dry_run:  # no GPU: every test would be skipped; collecting them checks the tier imports
        argv.append("--collect-only")
    return Plan([argv])


STAGES: tuple[Stage, ...] = (
    Stage("setup", "install carried wheels; record versions, CUDA, cuDNN, the GPU, the commit", 120, 10, plan_setup),
    Stage("probe", "SDPA's choice, attention backends, bf16 / FP8 GEMMs, fused LoRA vs cuBLAS, copy bandwidth",
          90, 20, plan_probe),
    Stage("headline", "5B 49x480x720 batch 1: the reference path vs configs/t2v_h100.yaml, 2 warm-up + 5 steps",
          330, 90, plan_headline),
    Stage("selective", "the same fastcog path with selective checkpointing (what an 80 GB card runs)",
          150, 60, plan_selective),
    Stage("kernels", "bench/kernel_bench.py: the fused kernels against eager and compiled, target lines",
          90, 30, plan_kernels),
    Stage("ablation", "leave-one-out: the fastcog path without one switch per row", None, 60, plan_ablation),
    Stage("gputests", "pytest -m gpu: the GPU test tier", None, 30, plan_gputests),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
