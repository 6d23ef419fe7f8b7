"""--reference-from: the reference path's results taken from an earlier run's JSON instead of running
it again (the reference is the slowest path).

The earlier run must have measured the same thing: the same variant, architecture, shape, batch,
LoRA, seed, B init, dtype, warm-up count, the same reference config (model, lora and optim sections),
the same GPU (or CPU) model and torch / diffusers / peft versions, and at least as many recorded
steps as the longest row here. Every path of this run then uses the earlier run's LR schedule
length, so step k runs at the same learning rate as the reference's step k. The starting adapters
are a function of the seed and the shapes (paths.start_adapters), so they are the earlier run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import UsageError

if TYPE_CHECKING:
    import argparse

    import torch

    from fastcog.config import Config

    from .paths import PathResult
    from .rows import PathSpec

LORA_NOT_COMPARED = ("not computed: the reference ran in another process (--reference-from) and its JSON does "
                     "not hold its final adapters")


def load_run(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--reference-from {str(path)!r}: cannot read it as JSON: {err}") from None
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("fastcog.bench.throughput/"):
        raise UsageError(f"--reference-from {str(path)!r}: not a bench/throughput.py result")
    return report


def reference_entry(report: dict[str, Any], path: Path) -> dict[str, Any]:
    ref = next((p for p in report.get("paths", []) if p.get("role") == "reference"), None)
    if ref is None or ref.get("status") != "ok":
        status = "absent" if ref is None else ref.get("status")
        raise UsageError(f"--reference-from {str(path)!r}: its reference path did not run ({status})")
    return ref


def expected_setup(args: argparse.Namespace, cfg: Config, variant: str, tiny: bool, warmup: int,
                   hw: dict[str, Any], versions: dict[str, Any]) -> dict[str, Any]:
    """This run's values of the fields the earlier run must share, as its JSON spells them."""
    return {
        "setup.variant": variant, "setup.tiny": tiny,
        "setup.checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "setup.frames": cfg.data.num_frames, "setup.height": cfg.data.height, "setup.width": cfg.data.width,
        "setup.batch_size": cfg.train.batch_size, "setup.lora_rank": cfg.lora.rank,
        "setup.lora_alpha": cfg.lora.alpha, "setup.seed": cfg.train.seed, "setup.lora_b_init": args.lora_b_init,
        "setup.dtype": cfg.model.dtype, "setup.warmup_steps": warmup,
        "hardware.device": hw["device"], "hardware.name": hw["name"],
        **{f"versions.{pkg}": versions.get(pkg) for pkg in ("torch", "diffusers", "peft")},
    }


def check_reference(path: Path, args: argparse.Namespace, cfg: Config, ref_cfg: Config, variant: str, tiny: bool,
                    warmup: int, paths: list[PathSpec], device: torch.device) -> tuple[dict, dict, int]:
    """(the earlier report, its reference entry, its LR schedule length), or a one-line UsageError
    naming the first field that differs."""
    from fastcog.config import to_dict

    from .report import hardware, versions

    report = load_run(path)
    ref = reference_entry(report, path)
    earlier = {"setup": report.get("setup") or {}, "hardware": report.get("hardware") or {},
               "versions": report.get("versions") or {}}
    for field, ours in expected_setup(args, cfg, variant, tiny, warmup, hardware(device), versions()).items():
        section, key = field.split(".", 1)
        theirs = earlier[section].get(key)
        if theirs != ours:
            raise UsageError(f"--reference-from {str(path)!r}: {field} is {theirs!r} there, {ours!r} here")
    ours_cfg, theirs_cfg = to_dict(ref_cfg), ref.get("config") or {}
    for section in ("model", "lora", "optim"):
        for key, value in ours_cfg[section].items():
            # JSON turns tuples into lists: compare through JSON.
            theirs = (theirs_cfg.get(section) or {}).get(key)
            if json.loads(json.dumps(value)) != theirs:
                raise UsageError(f"--reference-from {str(path)!r}: the reference's {section}.{key} is {theirs!r} "
                                 f"there, {value!r} here")
    needed = warmup + max((p.steps for p in paths if p.role != "reference"), default=0)
    recorded = len(ref.get("losses") or [])
    if recorded < needed:
        raise UsageError(f"--reference-from {str(path)!r}: its reference recorded {recorded} steps, the longest row "
                         f"here needs {needed} ({warmup} warm-up + {needed - warmup})")
    s = earlier["setup"]
    total = s.get("total_steps") or (s.get("warmup_steps", 0) + s.get("timed_steps", 0))
    return report, ref, max(total, needed)


def floats(values: list | None) -> list[float]:
    """The JSON's numbers; a non-finite one was written as a string ("nan")."""
    return [float(v) for v in values or []]


def reused_result(spec: PathSpec, entry: dict[str, Any], path: Path) -> PathResult:
    """The reference's PathResult rebuilt from its JSON entry (parity and speedup use it as usual)."""
    from .paths import PathResult

    m = entry.get("metrics") or {}
    res = PathResult(spec, status="ok", build_s=m.get("build_s"), warmup_times=list(m.get("warmup_step_times_s") or []),
                     step_times=list((m.get("step_time_s") or {}).get("all") or []),
                     losses=floats(entry.get("losses")), grad_norms=floats(entry.get("grad_norms")),
                     lrs=floats(entry.get("lrs")), peak_allocated_gb=m.get("peak_memory_allocated_gb"),
                     peak_reserved_gb=m.get("peak_memory_reserved_gb"), planned_peak_gb=m.get("planned_peak_gb"),
                     planned_step_time_s=m.get("planned_step_time_s"),
                     planned_step_time_note=m.get("planned_step_time_note"), patch_report=entry.get("patches") or {},
                     attention_kernels=entry.get("attention_kernels"), attention_kernel=entry.get("attention_kernel"))
    res.reused_entry = {**entry, "reused_from": str(path)}
    return res
