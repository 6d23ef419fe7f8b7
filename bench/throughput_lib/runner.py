"""Running every planned path in order, rewriting the JSON after each, then the PNG, the markdown
table on stdout, and the exit status."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import CPU_NOTE, EXIT_FAILED, EXIT_OK, EXIT_PARITY
from .markdown import render_markdown
from .metrics import lora_divergence
from .paths import PathResult, run_path
from .plot import write_plot
from .report import _clean, build_report, git_info, hardware, output_stem, versions
from .reuse import LORA_NOT_COMPARED
from .rows import headline

if TYPE_CHECKING:
    from fastcog.config import Config

    from .models import Bench
    from .rows import PathSpec


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(report), indent=1))


def run_benchmark(args: argparse.Namespace, argv: list[str], bench: Bench, cfg: Config, paths: list[PathSpec],
                  source: str, reused: PathResult | None = None) -> int:
    """reused: the reference's result from --reference-from, reported instead of running it."""
    from fastcog.metrics import host_peak_rss_gb

    t_start = time.monotonic()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"hardware": hardware(bench.device), "versions": versions(), "git": git_info()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(bench, cfg, env["hardware"], started)
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    if bench.device.type == "cpu":
        print(CPU_NOTE, file=sys.stderr)

    top = headline(paths)
    results: list[PathResult] = []
    try:
        for spec in paths:
            over_budget = args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds
            if spec.role == "reference" and reused is not None:
                res = reused
                print(f"[reference] reused from {args.reference_from}", file=sys.stderr, flush=True)
            elif spec.role != "reference" and spec is not top and over_budget:
                res = PathResult(spec, status=f"skipped: --max-seconds {args.max_seconds:g} reached")
            elif spec.role != "reference" and results and not results[0].ok:
                res = PathResult(spec, status="skipped: the reference path failed")
            else:
                res = run_path(spec, bench)
                # What survives a path lives to the end: frozen, the next paths' collections skip it (a full
                # collection over the imported libraries takes about 0.25 s, and each path runs two).
                gc.freeze()
            if spec.role == "reference":
                bench.ref_final_lora = res.final_lora if res.ok else None
            elif res.final_lora is not None and reused is not None:
                res.lora_divergence = {"abs": None, "rel_to_update": None, "note": LORA_NOT_COMPARED}
                res.final_lora = None
            elif res.final_lora is not None and bench.ref_final_lora is not None and bench.init_lora is not None:
                res.lora_divergence = lora_divergence(bench.init_lora, bench.ref_final_lora, res.final_lora)
                res.final_lora = None  # compared: give the host memory back
            results.append(res)
            env["host_peak_rss_gb"] = host_peak_rss_gb()
            report = build_report(args, argv, bench, results, source, started, env, complete=False, headline=top)
            write_json(json_path, report)  # partial results survive a kill
    finally:
        gc.unfreeze()

    report = build_report(args, argv, bench, results, source, started, env, complete=True, headline=top)
    if not args.no_plot:
        try:
            write_plot(report, png_path)
            report["plot"] = str(png_path)
        except Exception as err:  # noqa: BLE001 - a missing plot must not lose the measurements
            report["plot"] = f"failed: {type(err).__name__}: {err}"
    write_json(json_path, report)
    print(render_markdown(report))
    print(f"wrote {json_path}" + (f" and {png_path}" if report.get("plot") == str(png_path) else ""))
    return exit_status(results, report, top)


def exit_status(results: list[PathResult], report: dict[str, Any], top: PathSpec | None) -> int:
    """1 when a path that had to run here did not: the reference (unless reused) or the headline row;
    3 when the headline row failed parity. The other rows' failures are recorded, not the exit status."""
    main_paths = [r for r in results if (r.spec.role == "reference" and r.reused_entry is None) or r.spec is top]
    if not all(r.ok for r in main_paths):
        for r in main_paths:
            if not r.ok:
                print(f"bench/throughput.py: the {r.spec.name} path did not run: {r.status}", file=sys.stderr)
        return EXIT_FAILED
    if top is None:
        return EXIT_OK
    if report["parity"] is None or report["parity"]["verdict"] != "PASS":
        print(f"bench/throughput.py: the {top.name} path FAILED parity (loss or gradient norm) with the reference",
              file=sys.stderr)
        return EXIT_PARITY
    return EXIT_OK

