"""bench/gpu_suite.py's CPU dry run: the whole suite on the tiny model with a small budget. It runs
the stages in their order, each writes its files before the next starts, a stage over its timeout
is cut and reported while the suite goes on, and the summary table comes last. The run itself is
tests/suite_dry_run.py's, shared with tests/test_bench_throughput.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.suite_dry_run import CUT_AFTER_S, CUT_STAGE, ROOT

SUITE = ROOT / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("fastcog_gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def dry_run(gpu_suite_dry_run) -> tuple[subprocess.CompletedProcess, Path, dict]:
    return gpu_suite_dry_run.done, gpu_suite_dry_run.out, gpu_suite_dry_run.report


def test_stages_run_in_order_and_the_summary_table_comes_last(dry_run, suite_module):
    done, out, report = dry_run
    names = [s["name"] for s in report["stages"]]
    assert names == list(suite_module.STAGE_NAMES)
    log = (out / "suite.log").read_text()
    starts = [log.index(f"== {name} (at most") for name in names]
    assert starts == sorted(starts)  # every stage ran, in the fixed order
    table = done.stdout[done.stdout.rindex("| stage | status |"):]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == names
    assert done.stdout.rstrip().endswith(table.rstrip())  # nothing printed after it
    assert "DRY RUN on CPU" in done.stdout
    statuses = {s["name"]: s["status"] for s in report["stages"]}
    assert all(status == "passed" for name, status in statuses.items() if name != CUT_STAGE), statuses
    assert done.returncode == 1  # one stage did not pass
    results = {s["name"]: s["result"] for s in report["stages"]}
    assert "no GPU" in results["setup"] and results["probe"].startswith("SDPA picks cogvideox-5b ")
    assert results["kernels"].startswith("target lines: ")


def test_each_stage_wrote_its_files_before_the_next_started(dry_run):
    _, out, report = dry_run
    expected = {"setup": ["environment.json"], "probe": ["probe.json", "probe.md"],
                "headline": ["throughput_*.json"], "selective": ["throughput_*.json"],
                "kernels": ["kernels_smoke.csv", "kernels_smoke.md"], "ablation": ["throughput_*.json"]}
    stages = report["stages"]
    for stage, following in zip(stages, stages[1:]):
        for pattern in expected.get(stage["name"], []):
            files = list((out / stage["name"]).glob(pattern))
            assert files, (stage["name"], pattern)
            for f in files:
                assert f.stat().st_mtime <= following["started_unix"], (f, following["name"])
    assert (out / "summary.md").read_text().count("| passed |") == len(stages) - 1


def test_a_stage_over_its_timeout_is_cut_and_reported(dry_run):
    done, out, report = dry_run
    cut = next(s for s in report["stages"] if s["name"] == CUT_STAGE)
    assert cut["status"].startswith("cut: at its 1 s timeout") and cut["timeout_s"] == CUT_AFTER_S
    assert cut["seconds"] < CUT_AFTER_S + 15  # SIGTERM at the timeout, SIGKILL 10 s later at most
    assert not (out / CUT_STAGE / "junit.xml").exists()  # it had not got that far
    assert f"| {CUT_STAGE} | cut: at its 1 s timeout" in (out / "summary.md").read_text()
    assert f"== {CUT_STAGE}: cut: at its 1 s timeout" in done.stdout  # then the summary, written and printed


def test_the_gpu_tier_stage_runs_pytest_on_the_gpu_marker(suite_module, tmp_path):
    suite = suite_module.Suite(out=tmp_path, repo=ROOT, python=["py"], dry_run=False, ablation_rows="x")
    (argv,) = suite_module.STAGES[-1].plan(suite).commands
    assert argv[:6] == ["py", "-m", "pytest", "-m", "gpu", "tests"]
    assert f"--junitxml={tmp_path}/gputests/junit.xml" in argv
    dry = suite_module.Suite(out=tmp_path, repo=ROOT, python=["py"], dry_run=True, ablation_rows="x")
    assert suite_module.STAGES[-1].plan(dry).commands[0][-1] == "--collect-only"


def test_later_stages_reuse_the_headline_reference(dry_run):
    _, out, report = dry_run
    headline = next((out / "headline").glob("throughput_*.json"))
    first = json.loads(headline.read_text())
    assert [p["name"] for p in first["paths"]][:2] == ["reference", "fastcog"]
    for stage in ("selective", "ablation"):
        later = json.loads(next((out / stage).glob("throughput_*.json")).read_text())
        reference = later["paths"][0]
        assert reference["reused_from"] == str(headline)
        assert reference["losses"] == first["paths"][0]["losses"]
        assert len(later["paths"]) >= 2 and all(p["status"] == "ok" for p in later["paths"]), later["paths"]
    line = next(s for s in report["stages"] if s["name"] == "headline")["result"]
    assert "reference: p50" in line and "fastcog: p50" in line and "parity PASS" in line


def test_the_stage_timeout_is_its_cap_lowered_by_what_is_left(suite_module):
    headline = next(s for s in suite_module.STAGES if s.name == "headline")
    assert suite_module.stage_timeout(headline, 1000, 10, None) == (headline.cap_s, headline.min_s)
    assert suite_module.stage_timeout(headline, 200, 10, None) == (190, headline.min_s)
    timeout, minimum = suite_module.stage_timeout(headline, 50, 10, None)
    assert timeout < minimum  # not started: it could not finish
    assert suite_module.stage_timeout(headline, 1000, 10, 5) == (5, 5)  # an override is the cap and the minimum


def test_a_failed_fastcog_path_is_run_again_with_sdpa(suite_module, tmp_path, monkeypatch):
    from suite_lib.proc import CommandResult

    suite = suite_module.Suite(out=tmp_path, repo=ROOT, python=["python"], dry_run=True, ablation_rows="x")
    calls = []

    def fake_run(argv, *, deadline, tee, env, cwd):
        calls.append(argv)
        folder = Path(argv[argv.index("--out-dir") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        second = {"name": "fastcog", "status": "failed: RuntimeError: compile"} if len(calls) == 1 else \
            {"name": "fastcog", "status": "ok"}
        (folder / "throughput_x.json").write_text(json.dumps({"paths": [{"name": "reference", "status": "ok"},
                                                                        second]}))
        return CommandResult(1 if len(calls) == 1 else 0, 0.1)

    monkeypatch.setattr(suite_module, "run_command", fake_run)
    headline = next(s for s in suite_module.STAGES if s.name == "headline")
    log = suite_module.Tee(open(os.devnull, "w"))
    status = suite_module.run_stage(suite, headline, float("inf"), 100, {}, log)
    assert status == "failed: a main path did not run (exit 1); sdpa fallback passed"
    assert len(calls) == 2
    fallback = calls[1]
    assert fallback[fallback.index("--fast-only-set") + 1] == "fast.attention=sdpa"
    assert fallback[fallback.index("--reference-from") + 1] == str(tmp_path / "headline" / "throughput_x.json")
    assert fallback[fallback.index("--out-dir") + 1] == str(tmp_path / "headline_sdpa")
    line = suite_module.result_line(suite, headline)
    assert "fastcog: failed: RuntimeError: compile || sdpa fallback: " in line and line.endswith("fastcog: p50 - s, "
                                                                                                 "peak - GB")


def test_bad_options_are_one_line(suite_module, tmp_path, capsys):
    for argv, words in ((["--stages", "nope"], "choose from setup, probe"),
                        (["--stage-timeout", "kernels=soon"], "SECONDS must be a number"),
                        (["--stage-timeout", "nope=3"], "'nope' is not a stage")):
        assert suite_module.main(["--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_without_a_gpu_the_setup_stage_fails_in_one_line(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcog_suite_environment", ROOT / "bench" / "suite_lib" /
                                                  "environment.py")
    environment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(environment)
    monkeypatch.setattr(environment, "REQUIRED_MODULES", ())  # the dry run's setup stage imports them
    record = tmp_path / "environment.json"
    assert environment.main([str(record), "--require-cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("setup: no CUDA device") and "\n" not in err
    written = json.loads(record.read_text())
    assert written["gpu"]["cuda_available"] is False and written["versions"]["peft"]
    assert environment.main([str(record)]) == 0  # the dry run's setup
