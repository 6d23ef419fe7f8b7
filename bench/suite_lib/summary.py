"""The suite's summary: each stage's status and time, and the one line a reader wants from its
results, read back from the files the stage wrote. Rewritten after every stage (summary.md,
suite.json), printed once at the end."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NOT_RUN = "not run: the suite ended first"


@dataclass
class StageRecord:
    name: str
    what: str
    status: str = NOT_RUN
    """passed | failed: ... | cut: ... | skipped: ... | not run: ..."""
    seconds: float | None = None
    timeout_s: float | None = None
    result: str = ""
    """One line from the stage's own result files."""
    started_unix: float | None = None
    ended_unix: float | None = None
    """Wall-clock start and end (time.time()): a reader can check that a stage's files predate the next stage."""


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # a file cut mid-write by a kill
        return None


def throughput_line(path: Path | None) -> str:
    """Each path's p50, peak memory and attention kernel; the speedup and parity of the fastcog row."""
    report = _load(path)
    if report is None:
        return "no throughput results"
    parts = []
    for p in report.get("paths", []):
        m = p.get("metrics") or {}
        if p.get("status") != "ok":
            parts.append(f"{p.get('name')}: {p.get('status')}")
            continue
        p50 = (m.get("step_time_s") or {}).get("p50")
        kernel = p.get("attention_kernel")
        parts.append(f"{p.get('name')}: p50 {_fmt(p50, '.3f')} s, peak {_fmt(m.get('peak_memory_allocated_gb'), '.1f')}"
                     f" GB" + (f", {kernel}" if kernel else ""))
    parity = report.get("parity") or {}
    if report.get("speedup") is not None:
        parts.append(f"speedup {report['speedup']:.2f}x")
    if parity.get("verdict"):
        parts.append(f"parity {parity['verdict']}")
    return "; ".join(parts)


def probe_line(path: Path) -> str:
    """SDPA's own choice, the fastest attention backend against auto's pick, FP8 and fused-LoRA ratios."""
    report = _load(path)
    if report is None:
        return "no probe results"
    s = report.get("summary") or {}
    parts = []
    if s.get("sdpa_choice"):
        parts.append("SDPA picks " + ", ".join(f"{k} {v}" for k, v in s["sdpa_choice"].items()))
    if s.get("attention_fastest") is not None:
        parts.append(f"fastest attention {_plain(s['attention_fastest'])}, auto {_plain(s.get('auto_backend'))}")
    for key, label in (("fp8_rowwise_speedup", "FP8 rowwise / bf16"),
                       ("lora_fused_over_unfused_forward_backward", "fused / unfused LoRA fwd+bwd")):
        if s.get(key):
            parts.append(f"{label}: " + ", ".join(f"{k} {_plain(v)}" for k, v in s[key].items()))
    if s.get("copy_gb_per_s") is not None:
        parts.append(f"copy {_plain(s['copy_gb_per_s'])} GB/s")
    if not report.get("complete"):
        parts.append("incomplete")
    return "; ".join(parts) or "probe wrote no summary"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value)


def pytest_line(path: Path) -> str:
    if not path.is_file():
        return "no pytest output"
    # pytest's closing line, e.g. "3 passed, 2 skipped in 4.10s" or "199/1199 tests collected ... in 2.71s"
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if re.search(r"\b(passed|failed|skipped|errors?|tests? collected|no tests ran)\b.* in [\d.]+s\b", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line"


def kernels_line(path: Path) -> str:
    """How many of kernel_bench's target lines say MET (its table ends with one line per target)."""
    if not path.is_file():
        return "no kernel table"
    text = path.read_text(errors="replace")
    missed = len(re.findall(r"\bNOT MET\b", text))
    met = len(re.findall(r"\bMET\b", text)) - missed
    return f"target lines: {met} MET, {missed} NOT MET"


def render(records: list[StageRecord], header: list[str]) -> str:
    lines = [*header, "", "| stage | status | s | timeout s | result |", "|---|---|---|---|---|"]
    for r in records:
        result = r.result.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {_fmt(r.seconds, '.0f')} | {_fmt(r.timeout_s, '.0f')} | {result} |")
    return "\n".join(lines) + "\n"


def write(out: Path, records: list[StageRecord], header: list[str], meta: dict[str, Any]) -> str:
    """summary.md and suite.json in `out`, both complete after every stage."""
    text = render(records, header)
    (out / "summary.md").write_text(text)
    (out / "suite.json").write_text(json.dumps({**meta, "stages": [asdict(r) for r in records]}, indent=1))
    return text
