"""Running every planned path in order, rewriting the JSON after each, then the PNG, the markdown
table on stdout, and the exit status."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from .common import CPU_NOTE, EXIT_FAILED, EXIT_OK, EXIT_PARITY
from .metrics import lora_divergence
from .paths import PathResult, run_path
from .report import _clean, build_report, git_info, hardware, output_stem, render_markdown, versions, write_plot

if TYPE_CHECKING:
    from fastcog.config import Config

    from .models import Bench
    from .paths import PathSpec


def run_benchmark(args: argparse.Namespace, argv: list[str], bench: Bench, cfg: Config, paths: list[PathSpec],
                  source: str) -> int:
    from fastcog.metrics import host_peak_rss_gb

    t_start = time.monotonic()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"hardware": hardware(bench.device), "versions": versions(), "git": git_info()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(bench, cfg, env["hardware"], started)
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    if bench.device.type == "cpu":
        print(CPU_NOTE, file=sys.stderr)

    results: list[PathResult] = []
    for spec in paths:
        over_budget = args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds
        if spec.role == "ablation" and over_budget:
            res = PathResult(spec, status=f"skipped: --max-seconds {args.max_seconds:g} reached")
        elif spec.role != "reference" and results and not results[0].ok:
            res = PathResult(spec, status="skipped: the reference path failed")
        else:
            res = run_path(spec, bench)
        if spec.role == "reference" and res.ok:
            bench.ref_final_lora = res.final_lora
        elif res.final_lora is not None and bench.ref_final_lora is not None and bench.init_lora is not None:
            res.lora_divergence = lora_divergence(bench.init_lora, bench.ref_final_lora, res.final_lora)
            res.final_lora = None  # compared: give the host memory back
        results.append(res)
        env["host_peak_rss_gb"] = host_peak_rss_gb()
        report = build_report(args, argv, bench, results, source, started, env, complete=False)
        json_path.write_text(json.dumps(_clean(report), indent=1))  # partial results survive a kill

    report = build_report(args, argv, bench, results, source, started, env, complete=True)
    if not args.no_plot:
        try:
            write_plot(report, png_path)
            report["plot"] = str(png_path)
        except Exception as err:  # noqa: BLE001 - a missing plot must not lose the measurements
            report["plot"] = f"failed: {type(err).__name__}: {err}"
    json_path.write_text(json.dumps(_clean(report), indent=1))
    print(render_markdown(report))
    print(f"wrote {json_path}" + (f" and {png_path}" if report.get("plot") == str(png_path) else ""))
    return exit_status(results, report)


def exit_status(results: list[PathResult], report: dict[str, Any]) -> int:
    main_paths = [r for r in results if r.spec.role in ("reference", "fastcog")]
    if not all(r.ok for r in main_paths):
        for r in main_paths:
            if not r.ok:
                print(f"bench/throughput.py: the {r.spec.name} path did not run: {r.status}", file=sys.stderr)
        return EXIT_FAILED
    if report["parity"] is None or report["parity"]["verdict"] != "PASS":
        print("bench/throughput.py: the fastcog path FAILED parity (loss or gradient norm) with the reference",
              file=sys.stderr)
        return EXIT_PARITY
    return EXIT_OK
