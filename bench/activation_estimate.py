"""Activation memory per checkpointing policy at real CogVideoX shapes, without a GPU.

Builds one real-size block of each variant (random bf16 weights, LoRA r=128 on q/k/v/out,
fastcog's attention processor), runs `fastcog.fast.checkpointing.estimate_block_activations`
(the block's forward on fake tensors at the real token count, counting what autograd saves;
exact against a real run on the tiny model, tests/test_fast_units.py) and scales to the
variant's block count. The bytes depend on shapes, not the device, except that the attention
op is CPU SDPA's here (its saved output and log-sum-exp have the sizes of the GPU kernels').

    python bench/activation_estimate.py [--out bench/results/activation_estimate_<date>.md]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from fastcog.config import LoraConfig
from fastcog.fast import checkpointing as ac
from fastcog.fast.attention import set_attention_backend
from fastcog.lora import inject_lora
from fastcog.variants import FULL_TRANSFORMER_CONFIGS

# (variant, frames, height, width) -> video tokens: F_lat x (H/16) x (W/16), 1.5 patches time in pairs.
SHAPES = [("cogvideox-2b", 49, 480, 720), ("cogvideox-5b", 49, 480, 720), ("cogvideox1.5-5b", 81, 768, 1360)]


def video_tokens(variant: str, frames: int, height: int, width: int) -> int:
    latent_frames = (frames - 1) // 4 + 1
    if FULL_TRANSFORMER_CONFIGS[variant].get("patch_size_t"):
        latent_frames = (latent_frames + 1) // 2
    return latent_frames * (height // 16) * (width // 16)


def estimate(variant: str, tokens: int) -> ac.ActivationEstimate:
    from diffusers import CogVideoXTransformer3DModel

    arch = dict(FULL_TRANSFORMER_CONFIGS[variant])
    blocks, arch["num_layers"] = arch["num_layers"], 1
    model = CogVideoXTransformer3DModel(**arch).to(torch.bfloat16)
    inject_lora(model, LoraConfig(rank=128, alpha=64))
    set_attention_backend(model, "sdpa")
    one = ac.estimate_block_activations(model, 1, tokens, torch.bfloat16, torch.device("cpu"))
    return ac.ActivationEstimate(one.none, one.full, one.selective, blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gib = 2**30
    rows = ["| variant | frames x H x W | tokens | blocks | per block none / selective / full (MiB) "
            "| peak none / selective / full (GiB) |", "|---|---|---:|---:|---|---|"]
    for variant, f, h, w in SHAPES:
        tokens = video_tokens(variant, f, h, w)
        e = estimate(variant, tokens)
        rows.append(f"| {variant} | {f}x{h}x{w} | {tokens} | {e.blocks} | {e.none / 2**20:.0f} / "
                    f"{e.selective / 2**20:.0f} / {e.full / 2**20:.0f} | "
                    + " / ".join(f"{e.peak(p) / gib:.1f}" for p in ("none", "selective", "full")) + " |")
    text = "\n".join([
        "# Activation memory per checkpointing policy (fake-tensor estimate, batch 1, bf16, LoRA r=128)",
        "",
        f"- date: {datetime.date.today()}; torch {torch.__version__}",
        "- produced by `python bench/activation_estimate.py`",
        "- what: bytes autograd saves for backward, one block measured on fake tensors at the real shape, times",
        "  the block count, plus one block's full set while it is recomputed",
        "  (fastcog.fast.checkpointing `ActivationEstimate.peak`).",
        "  Weights, gradients, optimizer state and the non-block layers are not included.",
        "",
        *rows,
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
