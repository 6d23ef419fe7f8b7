"""fastcog's GPU measurements in one command, most important first, written as they are produced.

    python bench/gpu_suite.py --out OUT [--budget-s 570]      # on the GPU machine
    python bench/gpu_suite.py --out /tmp/suite --dry-run      # the plumbing on a CPU, tiny model

Stages, in this order (bench/suite_lib/stages.py holds each one's commands and time cap):

  setup      install the wheels found in wheels/ or .whl/ (bench/fetch_gpu_wheels.py) into /tmp/site,
             put it first on PYTHONPATH; record versions, CUDA, cuDNN, the GPU and the commit
  probe      bench/gpu_probe.py: SDPA's own choice, each attention backend, bf16 / FP8 GEMM rates,
             the fused LoRA-linear against cuBLAS + addmm, device-to-device bandwidth
  headline   bench/throughput.py: CogVideoX-5B, 49x480x720, batch 1, the reference path against
             configs/t2v_h100.yaml, 2 warm-up + 5 timed steps. If the fastcog path fails, it is run
             again with fast.attention=sdpa (headline_sdpa/) and both are reported
  selective  the same fastcog path with selective checkpointing: on a 141 GB card `auto` picks none,
             on an 80 GB one selective, so this row is the 80 GB card's speed (reference reused)
  kernels    bench/kernel_bench.py: the fused kernels against eager and compiled, with target lines
  ablation   bench/throughput.py leave-one-out rows: the fastcog path without one switch per row
  gputests   pytest -m gpu tests: the GPU test tier

Time: --budget-s caps the whole run. Each stage runs under min(its cap, the time left less
--reserve-s for the summary), and a stage whose minimum no longer fits is skipped, not started.
A stage cut at its timeout keeps what it wrote (bench/throughput.py rewrites its JSON after every
path, the probe after every measurement).

Output, all under --out and each written when it exists: suite.log (everything printed),
<stage>/stage.log, each stage's result files in <stage>/, and summary.md + suite.json (every
stage's status, time and one-line result), rewritten after each stage; the summary table is
printed last, with the stages that did not run listed as such. A copy with no .git records the
commit given as FASTCOG_GIT_COMMIT (and FASTCOG_GIT_DIRTY).

Exit status: 0 when every selected stage passed, 1 otherwise, 2 a bad option.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # suite_lib, also when loaded by file path

from suite_lib import summary
from suite_lib.proc import Tee, run_command
from suite_lib.stages import ABLATION_TAIL_S, SITE, STAGE_NAMES, STAGES, Stage, Suite, stage_dir, throughput_json

REPO = Path(__file__).resolve().parents[1]


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="bench/gpu_suite.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for every result (created)")
    p.add_argument("--budget-s", type=float, default=570.0, help="the whole run's wall-clock cap (default 570)")
    p.add_argument("--reserve-s", type=float, default=10.0, help="kept back from every stage for the summary")
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma-separated subset, run in the fixed order ({', '.join(STAGE_NAMES)})")
    p.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help="a lower cap for one stage (repeatable)")
    p.add_argument("--ablation-rows", default="leave-one-out", help="bench/throughput.py --rows of the ablation")
    p.add_argument("--dry-run", action="store_true", help="a CPU plumbing run: tiny model, smoke modes, GPU tests "
                   "collected only")
    p.add_argument("--python", default=shlex.quote(sys.executable), help="the interpreter command of every stage")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGE_NAMES]
    if unknown or not chosen:
        raise UsageError(f"--stages {args.stages!r}: choose from {', '.join(STAGE_NAMES)}")
    args.stages = set(chosen)
    caps = {}
    for item in args.stage_timeout:
        name, _, seconds = item.partition("=")
        if name not in STAGE_NAMES:
            raise UsageError(f"--stage-timeout {item!r}: {name!r} is not a stage ({', '.join(STAGE_NAMES)})")
        try:
            caps[name] = float(seconds)
        except ValueError:
            raise UsageError(f"--stage-timeout {item!r}: SECONDS must be a number") from None
    args.stage_timeout = caps
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s={args.budget_s:g}: must be > 0")
    return args


def stage_timeout(stage: Stage, left_s: float, reserve_s: float, override_s: float | None) -> tuple[float, float]:
    """(timeout, minimum) for a stage with `left_s` of the budget left: its cap, lowered by an override
    and by what is left less the reserve; it starts only if the timeout reaches the minimum."""
    cap = min(stage.cap_s if stage.cap_s is not None else math.inf, override_s if override_s is not None else math.inf)
    timeout = min(cap, left_s - reserve_s)
    return timeout, min(stage.min_s, cap)


def status_of(stage: Stage, returncode: int | None, timeout: float) -> str:
    if returncode is None:
        return f"cut: at its {timeout:.0f} s timeout; what it wrote is kept"
    if returncode == 0:
        return "passed"
    if stage.name in ("headline", "selective", "ablation"):  # bench/throughput.py's exit statuses
        meaning = {1: "a main path did not run", 2: "bad option or config", 3: "parity FAIL"}.get(returncode)
        if meaning:
            return f"failed: {meaning} (exit {returncode})"
    return f"failed: exit {returncode}"


def result_line(suite: Suite, stage: Stage) -> str:
    folder = stage_dir(suite, stage.name)
    if stage.name == "setup":
        env = summary._load(folder / "environment.json")
        if env is None:
            return "no environment record"
        v, gpu = env.get("versions", {}), env.get("gpu", {})
        return (f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}, "
                f"diffusers {v.get('diffusers')}, peft {v.get('peft')}, torchao {v.get('torchao')}; "
                f"{gpu.get('name', 'no GPU')}; commit {(env.get('git') or {}).get('commit')}")
    if stage.name == "probe":
        return summary.probe_line(folder / "probe.json")
    if stage.name == "kernels":
        return summary.kernels_line(folder / ("kernels_smoke.md" if suite.dry_run else "kernels.md"))
    if stage.name == "gputests":
        return summary.pytest_line(folder / "stage.log")
    line = summary.throughput_line(throughput_json(suite, stage.name))
    if stage.name == "headline" and throughput_json(suite, "headline_sdpa") is not None:
        line += " || sdpa fallback: " + summary.throughput_line(throughput_json(suite, "headline_sdpa"))
    return line


def fastcog_path_failed(suite: Suite) -> bool:
    """The headline's reference ran but its fastcog path did not: worth one more try with SDPA attention."""
    report = summary._load(throughput_json(suite, "headline"))
    paths = (report or {}).get("paths", [])
    return len(paths) >= 2 and paths[0].get("status") == "ok" and paths[1].get("status") != "ok"


def run_stage(suite: Suite, stage: Stage, deadline: float, timeout: float, env: dict[str, str], log: Tee) -> str:
    plan = stage.plan(suite)
    if plan.skip:
        return f"skipped: {plan.skip}"
    folder = stage_dir(suite, stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stage.log", "a") as stage_log:
        tee = Tee(*log.files, stage_log)
        for argv in plan.commands:
            if stage.name == "ablation":  # no row started once the rest of the stage could not finish one
                tail = 5 if suite.dry_run else ABLATION_TAIL_S
                argv = [*argv, "--max-seconds", f"{max(timeout - tail, 1):.0f}"]
            result = run_command(argv, deadline=deadline, tee=tee, env=env, cwd=suite.repo)
            status = status_of(stage, result.returncode, timeout)
            if status != "passed":
                break
        if stage.name == "headline" and fastcog_path_failed(suite) and time.monotonic() < deadline:
            tee.write("== headline: the fastcog path failed; again with fast.attention=sdpa (headline_sdpa/)\n")
            reference = throughput_json(suite, "headline")
            argv = [*plan.commands[0], "--reference-from", str(reference), "--fast-only-set", "fast.attention=sdpa"]
            argv[argv.index("--out-dir") + 1] = str(stage_dir(suite, "headline_sdpa"))
            fallback = run_command(argv, deadline=deadline, tee=tee, env=env, cwd=suite.repo)
            status += f"; sdpa fallback {status_of(stage, fallback.returncode, timeout)}"
    return status


def child_env(suite: Suite) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not suite.dry_run and any(any((suite.repo / d).glob("*.whl")) for d in ("wheels", ".whl")):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, env.get("PYTHONPATH")]))
    return env


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        print(f"bench/gpu_suite.py: error: {err}", file=sys.stderr)
        return 2
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out=args.out.resolve(), repo=REPO, python=shlex.split(args.python), dry_run=args.dry_run,
                  ablation_rows=args.ablation_rows)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    dry = "; DRY RUN on CPU: plumbing only, no figure is a measurement" if args.dry_run else ""
    header = [f"# fastcog GPU suite, {started}", "", f"budget {args.budget_s:.0f} s{dry}"]
    meta = {"started": started, "budget_s": args.budget_s, "dry_run": args.dry_run, "argv": sys.argv,
            "commit": os.environ.get("FASTCOG_GIT_COMMIT")}
    records = [summary.StageRecord(s.name, s.what) for s in STAGES]
    for record in records:
        if record.name not in args.stages:
            record.status = "not selected (--stages)"
    env = child_env(suite)
    with open(suite.out / "suite.log", "a") as log_file:
        log = Tee(sys.stdout, log_file)
        log.write("\n".join(header) + "\n")
        setup_failed = False
        for stage, record in zip(STAGES, records):
            if stage.name not in args.stages:
                continue
            left = args.budget_s - (time.monotonic() - start)
            timeout, minimum = stage_timeout(stage, left, args.reserve_s, args.stage_timeout.get(stage.name))
            record.timeout_s = max(timeout, 0)
            if setup_failed:
                record.status = "skipped: the setup stage failed"
            elif timeout < minimum:
                record.status = f"skipped: {max(left, 0):.0f} s of the budget left, it needs {minimum:.0f} s"
            else:
                log.write(f"== {stage.name} (at most {timeout:.0f} s): {stage.what}\n")
                t0, record.started_unix = time.monotonic(), time.time()
                record.status = run_stage(suite, stage, t0 + timeout, timeout, env, log)
                record.seconds, record.ended_unix = time.monotonic() - t0, time.time()
                record.result = result_line(suite, stage)
                setup_failed = stage.name == "setup" and record.status != "passed"
                log.write(f"== {stage.name}: {record.status} ({record.seconds:.0f} s)\n")
            summary.write(suite.out, records, header, meta)
        text = summary.write(suite.out, records, header, {**meta, "seconds": time.monotonic() - start})
        log.write("\n" + text)
    chosen = [r for r in records if r.name in args.stages]
    return 0 if all(r.status == "passed" for r in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
