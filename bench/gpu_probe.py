"""GPU probe: in about a minute, the facts on this GPU that decide fastcog's defaults, most important first.

    python bench/gpu_probe.py --out DIR [--budget-s 90]      # on a CUDA GPU
    python bench/gpu_probe.py --out DIR --tiny                # CPU dry run (the default without CUDA)

In this order, each measurement recorded into DIR/probe.json as soon as it is made:

1. environment: torch, CUDA, cuDNN, triton versions; the GPU, its SM count and memory; the date (UTC)
2. sdpa_choice: the kernel SDPA would run (torch._fused_sdp_choice) for CogVideoX-5B attention, q, k, v
   [1, 48, 17776, 64] bf16 (226 text + 17,550 video tokens at 49x480x720), and CogVideoX-2B's
   [1, 30, 17776, 64] fp16
3. attention: each backend's forward and forward + backward at the 5B shape (SDPA restricted to cudnn,
   flash or efficient; FlashAttention-3 and flash-attn 2 when installed), beside what fastcog's
   ``fast.attention: auto`` picks here, so the table shows whether auto's pick is the fastest
4. gemm: bf16 (cuBLAS) and FP8 e4m3 ``torch._scaled_mm`` (rowwise and tensorwise scaling) at the three
   CogVideoX-5B linear shapes, M = 17,776 tokens, (K, N) = (3072, 3072), (3072, 12288), (12288, 3072)
5. lora_linear: the fused Triton LoRA linear against cuBLAS + addmm at r = 128, the same shapes, forward
   and forward + backward, frozen base
6. copy: device-to-device copy bandwidth of a 1 GiB tensor (bytes read + written)

DIR/probe.json is rewritten after every measurement (``"complete": false`` until the end), so a run cut
short keeps what it measured. At the end DIR/probe.md holds one table per section and is printed.

Budget: ``--budget-s`` bounds the whole probe, counted from the start (imports included). Before each
measurement the time left is compared with what it needs (``NEEDS_S``: rough guesses including
warm-up and compilation); one that does not fit is recorded as ``"skipped: budget"``. A measurement
that raises is recorded with its error (``"status": "error"``) and the probe goes on.

CPU dry run (no CUDA, or ``--tiny``): the same code at tiny shapes on CPU, the Triton kernel under its
interpreter, labelled "CPU dry run: not a measurement" in both files; backends that need CUDA are
recorded as unavailable. It checks the probe's machinery, its numbers mean nothing.

The layout of probe.json and the timing and FLOP conventions: bench/probe_lib/ (record, timing,
attention, gemm, lora, report).
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # the budget counts the imports below too

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # probe_lib, also when loaded by file path (tests)

from probe_lib import attention, gemm, lora, report  # noqa: E402
from probe_lib.record import OK, Probe, Unavailable, error_text  # noqa: E402
from probe_lib.timing import Timer  # noqa: E402

DRY_RUN_NOTE = "CPU dry run: not a measurement"
SECTIONS = {
    "environment": "Environment",
    "sdpa_choice": "SDPA's own choice at the real shape",
    "attention": "Attention backends at the CogVideoX-5B shape",
    "gemm": "GEMM rates at the CogVideoX-5B linear shapes",
    "lora_linear": "Fused LoRA linear against cuBLAS + addmm",
    "copy": "Device-to-device copy",
}
# Seconds a measurement may need on the GPU, warm-up and compilation included: rough guesses, for the
# budget check only. The fused LoRA ones include Triton compiling its kernel variants.
NEEDS_S = {"sdpa_choice": 2.0, "attention": 3.0, "gemm": 1.5, "lora_fused": 12.0, "lora_unfused": 1.5, "copy": 1.5}
# The dry run's measurements take well under a second each; the budget still applies to them.
TINY_NEEDS_S = dict.fromkeys(NEEDS_S, 0.0)


@dataclass(frozen=True)
class Setup:
    dry_run: bool
    device: torch.device
    attention_5b: tuple[int, int, int, int]  # B, H, S, D
    attention_2b: tuple[int, int, int, int]
    tokens: int
    gemm_shapes: tuple[tuple[int, int], ...]  # (K, N): in and out features
    rank: int
    copy_bytes: int
    timer: Timer
    needs: dict[str, float]


def make_setup(dry_run: bool) -> Setup:
    if dry_run:
        cpu = torch.device("cpu")
        return Setup(True, cpu, (1, 2, 64, 16), (1, 2, 64, 16), 37, ((48, 48), (48, 96), (96, 48)), 8, 2**20,
                     Timer(cpu, rep_ms=0.0, min_reps=1, max_reps=1, warmup=0), TINY_NEEDS_S)
    cuda = torch.device("cuda", torch.cuda.current_device())
    return Setup(False, cuda, (1, 48, 17776, 64), (1, 30, 17776, 64), 17776,
                 ((3072, 3072), (3072, 12288), (12288, 3072)), 128, 2**30,
                 Timer(cuda, rep_ms=200.0, min_reps=3, max_reps=200), NEEDS_S)


def _installed(module: str) -> str:
    return "installed" if importlib.util.find_spec(module) is not None else "not installed"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not importable ({e})"
    facts: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "measured_on": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "flash_attn_interface": _installed("flash_attn_interface"),
        "flash_attn": _installed("flash_attn"),
        "gpu": None, "capability": None, "sm_count": None, "memory_gib": None,
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, capability=f"sm{props.major}{props.minor}", sm_count=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2**30, 2))
    return facts


def copy_bandwidth(nbytes: int, device: torch.device, timer: Timer) -> dict[str, Any]:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timed = timer(lambda: dst.copy_(src))
    return {**timed, "gb_per_s": round(2 * nbytes / (timed["ms"] * 1e-3) / 1e9, 2)}


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_attention(probe: Probe, s: Setup) -> None:
    sec = probe.section("sdpa_choice")
    for model, shape, dtype in (("cogvideox-5b", s.attention_5b, torch.bfloat16),
                                ("cogvideox-2b", s.attention_2b, torch.float16)):
        probe.measure(sec, model, lambda shape=shape, dtype=dtype: attention.sdpa_choice(shape, dtype, s.device),
                      s.needs["sdpa_choice"])
    probe.done("sdpa_choice")
    probe.data["summary"]["sdpa_choice"] = {m: r.get("backend") for m, r in sec.items() if isinstance(r, dict)}

    sec = probe.section("attention")
    sec.update(shape=list(s.attention_5b), dtype="bfloat16", flops=(
        f"TFLOP/s from forward FLOPs 4*B*H*S^2*D and forward + backward {attention.BACKWARD_FACTOR}x that"))
    probe.measure(sec, "auto", lambda: attention.auto_choice(s.device), 0.0)
    sec["backends"] = {}
    for name in attention.BACKENDS:
        sec["backends"][name] = recs = {}
        for backward in (False, True):
            probe.measure(recs, "forward_backward" if backward else "forward",
                          lambda name=name, backward=backward: attention.time_backend(
                              name, s.attention_5b, torch.bfloat16, s.device, s.timer, backward),
                          s.needs["attention"])
    sec["summary"] = attention.summarize(sec["backends"], sec["auto"])
    fb = sec["summary"]["forward_backward"]
    probe.data["summary"].update(auto_backend=fb["auto"], attention_fastest=fb["fastest"],
                                 auto_is_fastest=fb["auto_is_fastest"])
    probe.done("attention")


def probe_gemm(probe: Probe, s: Setup) -> None:
    sec = probe.section("gemm")
    sec.update(m=s.tokens, note=gemm.NOTE, shapes={})
    for k, n in s.gemm_shapes:
        sec["shapes"][f"{k}->{n}"] = shape = {"k": k, "n": n}
        probe.measure(shape, "bf16", lambda k=k, n=n: gemm.bf16(s.tokens, k, n, s.device, s.timer), s.needs["gemm"])
        for recipe in gemm.RECIPES:
            rec = probe.measure(shape, f"fp8_{recipe}", lambda k=k, n=n, recipe=recipe: gemm.fp8(
                s.tokens, k, n, recipe, s.device, s.timer), s.needs["gemm"])
            both = rec["status"] == OK and shape["bf16"]["status"] == OK
            shape[f"fp8_{recipe}_speedup"] = round(shape["bf16"]["ms"] / rec["ms"], 3) if both else None
    probe.data["summary"]["fp8_rowwise_speedup"] = {
        label: sh["fp8_rowwise_speedup"] for label, sh in sec["shapes"].items()}
    probe.done("gemm")


def probe_lora(probe: Probe, s: Setup) -> None:
    sec = probe.section("lora_linear")
    sec.update(m=s.tokens, rank=s.rank, dtype="bfloat16", scale=lora.SCALE)
    restore: list = []

    def pin() -> dict[str, Any]:
        info, undo = lora.pin_first_config()
        restore.append(undo)
        return info

    pinned = probe.measure(sec, "kernel", pin, 0.0)["status"] == OK
    sec["shapes"] = {}
    try:
        for k, n in s.gemm_shapes:
            sec["shapes"][f"{k}->{n}"] = shape = {"k": k, "n": n}
            for backward in (False, True):
                for kind, forward in (("fused", lora.fused), ("unfused", lora.unfused)):
                    def run(k=k, n=n, forward=forward, backward=backward, kind=kind) -> dict[str, Any]:
                        if kind == "fused" and not pinned:
                            raise Unavailable("the kernel's config could not be pinned (see kernel): not timed")
                        return lora.measure(forward, backward, s.tokens, k, n, s.rank, s.device, s.timer)

                    direction = "forward_backward" if backward else "forward"
                    probe.measure(shape, f"{kind}_{direction}", run, s.needs[f"lora_{kind}"])
            lora.ratios(shape)
    finally:
        for undo in restore:
            undo()
    probe.data["summary"]["lora_fused_over_unfused_forward_backward"] = {
        label: sh["fused_over_unfused_forward_backward"] for label, sh in sec["shapes"].items()}
    probe.done("lora_linear")


def probe_copy(probe: Probe, s: Setup) -> None:
    sec = probe.section("copy")
    sec["bytes"] = s.copy_bytes
    rec = probe.measure(sec, "result", lambda: copy_bandwidth(s.copy_bytes, s.device, s.timer), s.needs["copy"])
    probe.data["summary"]["copy_gb_per_s"] = rec.get("gb_per_s")
    probe.done("copy")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for probe.json and probe.md")
    p.add_argument("--budget-s", type=float, default=90.0, help="seconds for the whole probe (default 90)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run at tiny shapes (the default without CUDA)")
    args = p.parse_args(argv)
    if args.budget_s < 0:
        p.error("--budget-s must be >= 0")
    return args


def main(argv: list[str] | None = None, started: float | None = None) -> dict[str, Any]:
    """Run the probe; returns the final record (also in DIR/probe.json)."""
    start = time.monotonic() if started is None else started
    args = parse(argv)
    dry_run = args.tiny or not torch.cuda.is_available()
    if dry_run:
        # The Triton kernel runs under the interpreter on CPU; the flag is read when fastcog.kernels is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    s = make_setup(dry_run)
    header = {
        "probe": "bench/gpu_probe.py",
        "dry_run": dry_run,
        "note": DRY_RUN_NOTE if dry_run else "measurement",
        "device": str(s.device),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timer": s.timer.describe(),
    }
    probe = Probe(args.out, args.budget_s, header, SECTIONS, start, after_error=free_memory)
    torch.manual_seed(0)
    # The environment is what every other number is read against, and takes milliseconds: always recorded.
    probe.measure(probe.section("environment"), "facts", lambda: environment(s.device), None)
    probe.done("environment")
    for step in (probe_attention, probe_gemm, probe_lora, probe_copy):
        try:
            step(probe, s)
        except Exception as e:  # noqa: BLE001 -- a fault outside any one measurement: recorded, the next step runs
            traceback.print_exc()
            probe.data["errors"].append({"step": step.__name__, "error": error_text(e)})
            probe.write()
        free_memory()
    print(probe.finish(report.render))
    return probe.data


if __name__ == "__main__":
    main(started=_STARTED)
