"""Which implementation each LoRA linear runs (``fast.lora_kernel``), measured per shape and cached on disk.

Values of ``fast.lora_kernel`` (fastcog.fast.lora describes the implementations):

    false             peft's forward (the reference)
    true / auto       per distinct shape, the fastest of fused, unfused and peft, timed on the GPU at build
    fused / unfused   that implementation on every LoRA linear with a plain nn.Linear or Fp8Linear base

A shape is (M tokens per step, K in, N out, r, compute dtype, base: linear / fp8-rowwise / fp8-tensorwise).
`auto` times each candidate on synthetic tensors of that shape: a peft LoRA Linear built like the
model's (fp32 adapters, frozen base, under autocast in the compute dtype), forward + backward for x
and the adapters, a warm-up then a few repetitions between CUDA events. A candidate that raises
(out of memory, a kernel that cannot run) is left out. On a CPU nothing is timed: `auto` runs
`fused`, the path the CPU tests cover, and the log says so.

Cache: one JSON file, ``$FASTCOG_CACHE_DIR/lora_choice.json`` (default ``$XDG_CACHE_HOME/fastcog`` or
``~/.cache/fastcog``)::

    {"format": 1,
     "choices": {"<GPU name> | torch <v> | triton <v> | fastcog <v>":
                   {"M=17776 K=3072 N=3072 r=128 bfloat16 fp8-rowwise":
                      {"choice": "unfused", "ms": {"fused": 1.9, "unfused": 1.7, "peft": 2.2}}}}}

A run reads it and times only the shapes missing for its environment (GPU, torch, triton, fastcog),
then writes it back (atomically). A file that cannot be read or parsed is ignored with one warning
and rewritten; one that cannot be written costs a warning, never the run.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcog.config_schema import LoraKernel
from fastcog.fast.lora import IMPLEMENTATIONS, base_kind

MODES: tuple[Any, ...] = typing.get_args(LoraKernel)
"""The values fast.lora_kernel accepts."""
CACHE_ENV = "FASTCOG_CACHE_DIR"
CACHE_FILE = "lora_choice.json"
CACHE_FORMAT = 1
WARMUP, REPS = 2, 5


@dataclass(frozen=True, order=True)
class LoraShape:
    """What the speed of one LoRA linear's forward + backward depends on."""

    m: int
    k: int
    n: int
    r: int
    dtype: str
    """torch dtype name of the compute dtype, e.g. ``bfloat16``."""
    base: str
    """fastcog.fast.lora.base_kind: ``linear``, ``fp8-rowwise`` or ``fp8-tensorwise``."""

    @property
    def key(self) -> str:
        return f"M={self.m} K={self.k} N={self.n} r={self.r} {self.dtype} {self.base}"


def shape_of(module: nn.Module, m: int, dtype: torch.dtype) -> LoraShape:
    """The shape of a fusable peft LoRA Linear (fastcog.fast.lora.fusable) at m tokens per step."""
    from fastcog.lora import ADAPTER_NAME

    r, k = module.lora_A[ADAPTER_NAME].weight.shape
    n = module.lora_B[ADAPTER_NAME].weight.shape[0]
    return LoraShape(m, k, n, r, str(dtype).removeprefix("torch."), base_kind(module))


@dataclass(frozen=True)
class Choice:
    implementation: str
    source: str
    """``forced`` (the config named it), ``cpu`` (auto without a GPU), ``measured`` or ``cache``."""
    ms: dict[str, float | None] = field(default_factory=dict)
    """Milliseconds per forward + backward by candidate (None: it failed); empty unless timed."""


@dataclass
class Choices:
    by_shape: dict[LoraShape, Choice]
    lines: list[str]
    """One log line per distinct shape, with its timings, when timed or read from the cache."""
    summary: str
    """How the choice was made, for the build's log line."""


Timer = Callable[[LoraShape, str], float]
"""Milliseconds per forward + backward of one implementation at one shape."""


def resolve_mode(value: Any) -> str:
    """fast.lora_kernel's value -> ``peft``, ``auto``, ``fused`` or ``unfused``."""
    if value is False:
        return "peft"
    if value is True or value == "auto":
        return "auto"
    if value in ("fused", "unfused"):
        return value
    raise ValueError(f"fast.lora_kernel={value!r} is not one of {list(MODES)}")


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastcog"
    return Path(root) / CACHE_FILE


def environment_key(device: torch.device) -> str:
    """What makes timings comparable: the GPU model and the torch, triton and fastcog versions."""
    import fastcog

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | torch {torch.__version__} | triton {triton} | fastcog {fastcog.__version__}"


def default_timer(device: torch.device) -> Timer | None:
    """CUDA events on a GPU; None elsewhere (nothing is timed)."""
    if device.type != "cuda":
        return None
    return lambda shape, impl: time_on_cuda(shape, impl, device)


def choose(shapes: Iterable[LoraShape], value: Any, device: torch.device, *, timer: Timer | None = None,
           env: str | None = None, path: Path | None = None) -> Choices:
    """The implementation of every distinct shape for fast.lora_kernel=`value`.

    timer: how to time a candidate (default: CUDA events on a GPU, none on a CPU); env: the cache's
    environment key (default environment_key(device)); path: the cache file (default cache_path()).
    """
    mode = resolve_mode(value)
    shapes = sorted(set(shapes))
    if mode != "auto":
        return Choices({s: Choice(mode, "forced") for s in shapes}, [], f"fast.lora_kernel={value}")
    timer = timer or default_timer(device)
    if timer is None:
        return Choices({s: Choice("fused", "cpu") for s in shapes}, [], f"auto on {device.type.upper()}: fused")
    env = env or environment_key(device)
    path = path or cache_path()
    cache = read_cache(path)
    known = cache.setdefault(env, {})
    by_shape, lines, measured = {}, [], 0
    for i, shape in enumerate(shapes, 1):
        entry = known.get(shape.key)
        if entry is not None:
            choice = Choice(entry["choice"], "cache", entry["ms"])
        else:
            ms = {impl: _time(timer, shape, impl) for impl in IMPLEMENTATIONS}
            choice = Choice(_fastest(ms), "measured", ms)
            known[shape.key] = {"choice": choice.implementation, "ms": ms}
            measured += 1
        by_shape[shape] = choice
        # A topic per shape ("lora shape 2: ..."): the run's banner keeps one line per topic.
        lines.append(f"lora shape {i}: {shape.key}: {choice.implementation} ({_times(choice.ms)}; {choice.source})")
    if measured:
        write_cache(path, cache)
    cached = len(shapes) - measured
    return Choices(by_shape, lines, f"auto: {measured} shape(s) timed, {cached} from the cache {path}")


def _time(timer: Timer, shape: LoraShape, impl: str) -> float | None:
    try:
        ms = float(timer(shape, impl))
    except Exception as err:  # a candidate that cannot run here is not a candidate; the run goes on
        warnings.warn(f"lora kernel: {impl} at {shape.key} failed while timed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); left out", stacklevel=3)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return round(ms, 4) if math.isfinite(ms) else None


def _fastest(ms: dict[str, float | None]) -> str:
    timed = {impl: t for impl, t in ms.items() if t is not None}
    return min(timed, key=timed.__getitem__) if timed else "peft"  # nothing ran: the reference


def _times(ms: dict[str, float | None]) -> str:
    return ", ".join(f"{impl} " + ("failed" if t is None else f"{t:.3f} ms") for impl, t in ms.items())


# --------------------------------------------------------------------------- the cache file


def _valid(data: Any) -> bool:
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("choices"), dict)):
        return False
    for entries in data["choices"].values():
        if not isinstance(entries, dict):
            return False
        for entry in entries.values():
            if not (isinstance(entry, dict) and entry.get("choice") in IMPLEMENTATIONS
                    and isinstance(entry.get("ms"), dict)):
                return False
    return True


def read_cache(path: Path) -> dict[str, dict[str, dict]]:
    """{environment: {shape key: {"choice", "ms"}}}; empty (with one warning) when unreadable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if _valid(data):
            return data["choices"]
        problem = "not a fastcog LoRA choice cache of this format"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    warnings.warn(f"lora kernel: ignoring the choice cache {path} ({problem}); timing again and rewriting it",
                  stacklevel=3)
    return {}


def write_cache(path: Path, choices: dict[str, dict[str, dict]]) -> None:
    """Atomically (a temporary file renamed over it): ranks and runs that share the file never see half of it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "choices": choices}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"lora kernel: could not write the choice cache {path} ({err}); the next run times again",
                      stacklevel=3)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- timing on a GPU


def synthetic_layer(shape: LoraShape, device: torch.device) -> nn.Module:
    """A peft LoRA Linear of `shape` as the model has it: frozen base (FP8 if the shape says so), fp32
    adapters with a non-zero B, on `device`."""
    from peft import LoraConfig, inject_adapter_in_model

    from fastcog.fast.fp8 import Fp8Linear

    dtype = getattr(torch, shape.dtype)
    holder = nn.Module()
    holder.proj = nn.Linear(shape.k, shape.n, device=device, dtype=dtype)
    inject_adapter_in_model(LoraConfig(r=shape.r, lora_alpha=shape.r, target_modules=["proj"], lora_dropout=0.0),
                            holder)
    layer = holder.proj
    layer.requires_grad_(False)
    for adapter in (layer.lora_A, layer.lora_B):
        for p in adapter.parameters():
            p.data = torch.randn(p.shape, device=device) * p.shape[1] ** -0.5
            p.requires_grad_(True)
    if shape.base.startswith("fp8-"):
        layer.base_layer = Fp8Linear(layer.base_layer, shape.base.removeprefix("fp8-"))
    return layer


def time_on_cuda(shape: LoraShape, impl: str, device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Milliseconds per forward + backward (x and the adapters) of `impl` at `shape`, by CUDA events."""
    from fastcog.fast.lora import route_lora

    layer = synthetic_layer(shape, device)
    route_lora(layer, lambda name, module: impl)
    dtype = getattr(torch, shape.dtype)
    x = torch.randn(shape.m, shape.k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape.m, shape.n, device=device, dtype=dtype)
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)
        torch.autograd.grad(y, leaves, dy)

    for _ in range(warmup):  # the first call also autotunes and compiles the Triton kernels
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
