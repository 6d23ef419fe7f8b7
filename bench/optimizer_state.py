"""Optimizer state bytes per trained value, for every optim.name.

For each parameter set below, builds the optimizer through fastcog.optim.build_optimizer, gives
every parameter a random gradient, takes one step (all of these create their state lazily at the
first step) and sums the bytes of the state tensors with fastcog.optim.optimizer_state_bytes:
tensor subclasses (torchao's low-bit states) count their inner codes / scales / maps, a tensor
shared between parameters (bitsandbytes' maps) once. Bytes are device-independent, so a CPU run
gives the real figure; nothing here is timed.

Parameter sets:
  demo         the tiny 5B-like transformer's LoRA as configs/demo.yaml sets it (rank 16, six targets)
  demo-r128    the same at rank 128 (every LoRA tensor at or above the low-bit size threshold)
  4096x4096    one fp32 matrix
  lora-5b      80 LoRA-sized tensors: 40 A [128, 3072] (random) + 40 B [3072, 128] (zero, as peft
               initialises B; Prodigy stores no initial copy of an all-zero tensor)

    python bench/optimizer_state.py --out bench/results/optimizer_state_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fastcog.config import OPTIMIZERS, LoraConfig, config_from_dict
from fastcog.optim import build_optimizer, optimizer_state_bytes
from fastcog.optimizers import OPTIMIZER_SPECS

DEMO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# 5B LoRA r128 on to_q/k/v/out.0: 42 blocks x 4 linears x (A [128, 3072] + B [3072, 128]).
LORA_5B_VALUES = 42 * 4 * 2 * 128 * 3072


def demo_params(rank: int) -> list[torch.nn.Parameter]:
    from diffusers import CogVideoXTransformer3DModel

    from fastcog.lora import inject_lora
    from fastcog.models import tiny_transformer_config

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**tiny_transformer_config("cogvideox-5b", 64, 96, 9))
    return inject_lora(transformer, LoraConfig(rank=rank, alpha=rank, target_modules=DEMO_TARGETS))


def square_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4096, 4096))]


def lora_5b_params() -> list[torch.nn.Parameter]:
    a = [torch.nn.Parameter(torch.randn(128, 3072) / 3072**0.5) for _ in range(40)]
    b = [torch.nn.Parameter(torch.zeros(3072, 128)) for _ in range(40)]
    return a + b


PARAM_SETS: dict[str, Callable[[], list[torch.nn.Parameter]]] = {
    "demo": lambda: demo_params(16),
    "demo-r128": lambda: demo_params(128),
    "4096x4096": square_params,
    "lora-5b": lora_5b_params,
}


def state_bytes(name: str, make: Callable[[], list[torch.nn.Parameter]]) -> tuple[int, int]:
    """(state bytes, trained values) after one step of optim.name on a fresh parameter set."""
    params = make()
    cfg = config_from_dict({"model": {"path": "unused"}, "data": {"data_root": "unused"},
                            "optim": {"name": name, "lr": 1.0 if name == "prodigy" else 1e-4, "lr_warmup_steps": 0}})
    optimizer, _ = build_optimizer(cfg, params, total_steps=1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    out = optimizer_state_bytes(optimizer), sum(p.numel() for p in params)
    del optimizer, params
    gc.collect()
    return out


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("torchao", "bitsandbytes", "prodigyopt", "came-pytorch", "diffusers"):
        out[pkg] = importlib.metadata.version(pkg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Prodigy's lr note and torchao's compile notes; not results
    rows = {}
    values = {}
    for set_name, make in PARAM_SETS.items():
        for name in OPTIMIZERS:
            nbytes, values[set_name] = state_bytes(name, make)
            rows[name, set_name] = nbytes
            print(f"{set_name:10s} {name:14s} {nbytes / values[set_name]:7.3f} B/value")
    lines = [
        "# Optimizer state bytes per trained value (CPU measurement; bytes do not depend on the device)",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- host: {platform.machine()}, {platform.python_version()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "- produced by: `python bench/optimizer_state.py --out <this file>`",
        "",
        "Method: build the optimizer with `fastcog.optim.build_optimizer`, random gradients, one step, then",
        "`fastcog.optim.optimizer_state_bytes` (the bytes of every state tensor in `state_dict()`; torchao's",
        "tensor-subclass states counted by their inner codes, scales and quantisation maps; a tensor shared",
        "between parameters counted once). Parameters and gradients are not included.",
        "",
        "Parameter sets (trained values): "
        + "; ".join(f"`{k}` {v:,}" for k, v in values.items()) + ".",
        "`demo` = configs/demo.yaml's LoRA (rank 16, six targets) on the tiny model; `demo-r128` the same at",
        "rank 128; `lora-5b` = 40 A [128, 3072] (random) + 40 B [3072, 128] (zero, as peft initialises B).",
        "",
        "| optim.name | " + " | ".join(f"{k} B/value" for k in PARAM_SETS)
        + " | 5B LoRA r128, GB (computed) | fastcog.optimizers B/value |",
        "|---|" + "---:|" * (len(PARAM_SETS) + 2),
    ]
    for name in OPTIMIZERS:
        per_value = [rows[name, k] / values[k] for k in PARAM_SETS]
        gb = per_value[-1] * LORA_5B_VALUES / 1e9
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_value)
                     + f" | {gb:.2f} | {OPTIMIZER_SPECS[name].state_bytes:.3f} |")
    lines += [
        "",
        "The last column is the state_bytes of fastcog.optimizers, which the activation-checkpointing memory",
        "estimate uses: it should match the `4096x4096` column (tensors the optimizer quantises or factors).",
        "",
        f"The GB column is the `lora-5b` figure times the {LORA_5B_VALUES:,} values of 5B LoRA r128 on",
        "to_q/to_k/to_v/to_out.0 (42 blocks): a computed figure, not a measurement on the real model.",
        "",
        "Notes:",
        "- Size thresholds: torchao quantises a tensor only if it has >= 4096 values and a multiple of its",
        "  block size (256 for 8-bit and fp8, 128 for 4-bit); bitsandbytes only if it has >= 4096 values",
        "  (`min_8bit_size`). Smaller tensors keep fp32 moments (8 B/value): at rank 16 every LoRA tensor of",
        "  the tiny model is smaller, hence no saving in the `demo` column.",
        "- 8-bit: 1 byte per moment value plus one fp32 scale per 256-value block (2 x (1 + 4/256) = 2.031);",
        "  torchao also keeps a 256-entry fp32 quantisation map per moment per tensor (2 KB per tensor: visible",
        "  at 4096-value tensors, `demo-r128`), bitsandbytes shares one map. 4-bit: half a byte per value",
        "  plus one fp32 scale per 128 values (2 x (0.5 + 4/128) = 1.063). fp8: 1 byte + a scale per 256.",
        "- torch and torchao keep a 4-byte step tensor per parameter, bitsandbytes a Python int (demo: 8.005",
        "  vs 8.000).",
        "- Prodigy keeps s, a copy of the initial weights p0, and both moments: 16 B/value; for an all-zero",
        "  tensor (LoRA B at init) p0 is one scalar, so LoRA averages 14.",
        "- CAME keeps the first moment (4 B/value) and factored row/column second moments and instability",
        "  for matrices (O(rows + cols)); vectors get a full second moment (8 B/value).",
        "- Nothing here is a time measurement; step times need the GPU.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
