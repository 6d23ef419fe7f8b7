"""DIR/probe.md: one table per section of probe.json. A cell that is not a number says why (error,
unavailable, skipped: budget); the full error or reason is listed under its table."""

from __future__ import annotations

from typing import Any

from .record import ERROR, OK, UNAVAILABLE

BACKEND_LABELS = {"cudnn": "cudnn (SDPA)", "flash": "flash (SDPA)", "efficient": "efficient (SDPA)",
                  "fa3": "fa3 (FlashAttention-3)", "flash_attn": "flash_attn (flash-attn 2)"}


def num(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.4g}{suffix}"


class Notes:
    """Footnotes of one table: every error and unavailable reason, in full, once per distinct text."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.cells: list[list[str]] = []

    def cell(self, rec: dict[str, Any] | None, field: str, what: str, suffix: str = "", quiet: bool = False) -> str:
        """rec's field, or why there is none; quiet: blank instead (a record's further columns)."""
        if not rec:
            return "-"  # not reached (the run was cut) or not recorded
        status = rec.get("status")
        if status == OK:
            return num(rec.get(field), suffix)
        if quiet:
            return ""
        if status in (ERROR, UNAVAILABLE):
            text = f"{status}: {rec.get('error') if status == ERROR else rec.get('reason')}"
            if text not in self.texts:
                self.texts.append(text)
                self.cells.append([])
            index = self.texts.index(text)
            self.cells[index].append(what)
            return f"{status} [{index + 1}]"
        return str(status)

    def render(self) -> list[str]:
        lines = [f"[{i}] {', '.join(cells)}: {text}" for i, (text, cells) in enumerate(zip(self.texts, self.cells), 1)]
        return ["", *lines] if lines else []


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows)]


def environment(sec: dict[str, Any]) -> list[str]:
    notes = Notes()
    facts = sec.get("facts") or {}
    if facts.get("status") != OK:
        return [notes.cell(facts, "", "environment"), *notes.render()]
    rows = [[k, "-" if v is None else str(v)] for k, v in facts.items() if k not in ("status", "wall_s", "at_s")]
    return _table(["fact", "value"], rows)


def sdpa_choice(sec: dict[str, Any]) -> list[str]:
    notes, rows = Notes(), []
    for model, rec in sec.items():
        if isinstance(rec, dict) and "status" in rec:
            rows.append([model, str(rec.get("shape", "-")), str(rec.get("dtype", "-")),
                         notes.cell(rec, "backend", model) if rec.get("status") != OK else str(rec["backend"])])
    return [*_table(["model", "q, k, v shape", "dtype", "SDPA runs"], rows), *notes.render()]


def attention(sec: dict[str, Any]) -> list[str]:
    notes, rows = Notes(), []
    for name, recs in (sec.get("backends") or {}).items():
        row = [BACKEND_LABELS.get(name, name)]
        for direction in ("forward", "forward_backward"):
            rec = recs.get(direction)
            what = f"{name} {direction.replace('_', '+')}"
            row += [notes.cell(rec, "ms", what), notes.cell(rec, "tflops", what, quiet=True)]
        rows.append(row)
    lines = [f"q, k, v {sec.get('shape')} {sec.get('dtype')}; {sec.get('flops')}", "",
             *_table(["backend", "forward ms", "forward TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"], rows)]
    auto = sec.get("auto") or {}
    if auto.get("status") == OK:
        lines += ["", f"fastcog's `auto` picks `{auto['backend']}` ({auto['reason']})."]
    elif auto:
        lines += ["", f"fastcog's `auto`: {notes.cell(auto, '', 'auto')}"]
    for direction, s in (sec.get("summary") or {}).items():
        label = direction.replace("_", "+")
        if s.get("fastest") is None:
            lines.append(f"- {label}: no backend measured")
            continue
        line = f"- {label}: fastest measured `{s['fastest']}` ({num(s['fastest_ms'])} ms)"
        if s.get("auto_over_fastest") is None:
            line += f"; auto's pick `{s.get('auto')}` was not measured"
        else:
            verdict = "auto's pick is the fastest" if s["auto_is_fastest"] else "auto's pick is not the fastest"
            line += f"; {verdict}: `{s['auto']}` takes {num(s['auto_over_fastest'])}x the fastest's time"
        lines.append(line)
    return [*lines, *notes.render()]


def gemm(sec: dict[str, Any]) -> list[str]:
    notes, rows = Notes(), []
    for label, shape in (sec.get("shapes") or {}).items():
        row = [label]
        for kind in ("bf16", "fp8_rowwise", "fp8_tensorwise"):
            rec = shape.get(kind)
            row += [notes.cell(rec, "ms", f"{label} {kind}"), notes.cell(rec, "tflops", "", quiet=True)]
            if kind != "bf16":
                row.append(num(shape.get(f"{kind}_speedup"), "x"))
        rows.append(row)
    header = ["K -> N", "bf16 ms", "bf16 TFLOP/s", "FP8 rowwise ms", "TFLOP/s", "speedup", "FP8 tensorwise ms",
              "TFLOP/s", "speedup"]
    return [f"M = {sec.get('m')} tokens; {sec.get('note')}", "", *_table(header, rows), *notes.render()]


def lora(sec: dict[str, Any]) -> list[str]:
    notes, rows = Notes(), []
    kernel = sec.get("kernel") or {}
    head = (f"kernel config: {kernel['config']} ({kernel['how']})" if kernel.get("status") == OK
            else f"kernel config: {notes.cell(kernel, '', 'kernel config')}")
    for label, shape in (sec.get("shapes") or {}).items():
        row = [label]
        for direction in ("forward", "forward_backward"):
            for kind in ("fused", "unfused"):
                row.append(notes.cell(shape.get(f"{kind}_{direction}"), "ms", f"{label} {kind} {direction}"))
            row.append(num(shape.get(f"fused_over_unfused_{direction}")))
        rows.append(row)
    header = ["K -> N", "fused fwd ms", "unfused fwd ms", "fused/unfused", "fused fwd+bwd ms", "unfused fwd+bwd ms",
              "fused/unfused"]
    return [f"M = {sec.get('m')} tokens, r = {sec.get('rank')}, {sec.get('dtype')}, frozen W and b; {head}", "",
            *_table(header, rows), *notes.render()]


def copy(sec: dict[str, Any]) -> list[str]:
    notes = Notes()
    rec = sec.get("result")
    size = sec.get("bytes")
    size_text = "-" if size is None else f"{size / 2**20:g} MiB" if size < 2**30 else f"{size / 2**30:g} GiB"
    rows = [[size_text, notes.cell(rec, "ms", "copy"), notes.cell(rec, "gb_per_s", "", quiet=True)]]
    return [*_table(["size", "ms", "GB/s (read + written)"], rows), *notes.render()]


RENDERERS = {"environment": environment, "sdpa_choice": sdpa_choice, "attention": attention, "gemm": gemm,
             "lora_linear": lora, "copy": copy}


def render(data: dict[str, Any]) -> str:
    lines = ["# fastcog GPU probe", ""]
    if data.get("dry_run"):
        lines += [f"**{data['note']}**", ""]
    state = "complete" if data.get("complete") else "INCOMPLETE (cut short: missing cells are marked -)"
    lines += [f"- {state}; {data.get('elapsed_s')} s of a {data.get('budget_s')} s budget; "
              f"device: {data.get('device')}; started {data.get('started_utc')}",
              f"- timer: {data.get('timer')}", ""]
    faults = data.get("errors") or []
    lines += [f"- error outside any one measurement, in {f['step']}: {f['error']}" for f in faults]
    lines += [""] if faults else []
    for name, sec in data.get("sections", {}).items():
        lines += [f"## {sec.get('title', name)}", ""]
        if sec.get("state") == "pending":
            lines += ["not reached", ""]
            continue
        if sec.get("state") == "running":
            lines += ["cut short: the section did not finish", ""]
        lines += [*RENDERERS[name](sec), ""]
    if data.get("dry_run"):
        lines += [f"**{data['note']}**", ""]
    return "\n".join(lines)
