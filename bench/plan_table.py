"""`fastcog plan` for every recipe in configs/ and for the reference path of each variant, at the
variants' real training shapes, as one table (Markdown + JSON) and one plot (peak per row, stacked
by kind). Runs on any machine: no weights, no GPU (architectures from fastcog.variants).

    python bench/plan_table.py --out bench/results/plan_table_<date>

Every figure is an estimate (fastcog.plan); the published figures beside them are other trainers'
own statements, quoted with their source.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shapes the variants were released for: 49x480x720 (2B, 5B), 81x768x1360 (1.5).
SHAPES = {"cogvideox-2b": (49, 480, 720), "cogvideox-5b": (49, 480, 720), "cogvideox-5b-i2v": (49, 480, 720),
          "cogvideox1.5-5b": (81, 768, 1360), "cogvideox1.5-5b-i2v": (81, 768, 1360)}
# Other trainers' published peak memory for batch-1 LoRA at these shapes: (variant, GB, source).
PUBLISHED = [
    ("cogvideox-5b", 24, "CogVideoX reference fine-tuning README: 5B LoRA, batch 1"),
    ("cogvideox1.5-5b", 35, "CogVideoX reference fine-tuning README: 1.5-5B LoRA, batch 1"),
]
RECIPE_GPU = {"t2v_5b_lowmem": "rtx4090"}  # the card a recipe is written for; h100-80gb otherwise


def reference_path(variant: str, training_type: str):
    """The reference trainer's settings as bench/throughput.py runs them: no fast path, full
    checkpointing, AdamW, LoRA r128 / alpha 64 (or full fine-tuning), batch 1."""
    from fastcog.config import config_from_dict

    frames, height, width = SHAPES[variant]
    return config_from_dict({
        "model": {"path": f"/models/{variant}", "variant": variant, "dtype": "bf16", "training_type": training_type},
        "data": {"data_root": "/data", "num_frames": frames, "height": height, "width": width},
        "lora": {"rank": 128, "alpha": 64},
        "train": {"batch_size": 1, "activation_checkpointing": "full"},
    })


def rows() -> list[dict]:
    from fastcog.config import load_config
    from fastcog.gpus import gpu_by_key
    from fastcog.plan_report import as_json, make_plan

    out = []
    for variant in SHAPES:
        for kind in ("lora", "sft"):
            cfg = reference_path(variant, kind)
            plan = make_plan(cfg, gpu_by_key("h100-80gb"))
            out.append({"row": f"reference path, {variant}, {kind}", **as_json(cfg, plan, [])})
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.stem == "demo":
            continue
        cfg = load_config(path)
        if cfg.model.variant != "auto":
            frames, height, width = SHAPES[cfg.model.variant]
            if cfg.model.variant.startswith("cogvideox1.5") and not cfg.data.buckets:
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_frames=frames, height=height,
                                                                        width=width))
        plan = make_plan(cfg, gpu_by_key(RECIPE_GPU.get(path.stem, "h100-80gb")))
        out.append({"row": f"configs/{path.name}", **as_json(cfg, plan, [])})
    return out


def markdown(table: list[dict], meta: dict) -> str:
    lines = [
        f"# `fastcog plan` per recipe, {meta['date']}",
        "",
        "Estimates, not measurements: bytes per GPU from fastcog.plan (weights as stored, fp32 gradients,",
        "optimizer state from the registry, activations of one block run on fake tensors, the flash-attention",
        "op standing in for the GPU's fused attention), at each variant's released shape, batch 1.",
        f"Computed on {meta['machine']} with torch {meta['torch']}, diffusers {meta['diffusers']}; command:",
        f"`{meta['command']}`. GB = 1e9 bytes.",
        "",
        "The reference path stores the frozen weights in bf16, as every fastcog run does; the reference",
        "trainer keeps them in fp32 under autocast, which adds their size once more (about 11 GB at 5B).",
        "",
        "| row | GPU | tokens | policy | frozen | trainable | grads | optimizer | activations | peak | fits |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        b = r["bytes"]
        lines.append(
            f"| {r['row']} | {r['gpu']} | {r['tokens_per_sample']} | {r['policy']} | {b['frozen_weights'] / 1e9:.2f} "
            f"| {b['trainable_weights'] / 1e9:.2f} | {b['gradients'] / 1e9:.2f} | {b['optimizer_state'] / 1e9:.2f} "
            f"| {b['activations'][r['policy']] / 1e9:.2f} | {b['peak'][r['policy']] / 1e9:.2f} | "
            f"{'yes' if r['fits'] else 'no'} |")
    lines += ["", "Published by others for the same settings (their figures, their sources):", ""]
    lines += [f"- {variant}: {gb} GB ({source})" for variant, gb, source in PUBLISHED]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("frozen_weights", "frozen weights"), ("trainable_weights", "trainable"), ("gradients", "gradients"),
             ("optimizer_state", "optimizer state")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(table) + 1.5))
    names = [f"{r['row']} ({r['policy']}, {r['gpu']})" for r in table]
    left = [0.0] * len(table)
    for key, label in kinds:
        values = [r["bytes"][key] / 1e9 for r in table]
        ax.barh(names, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values)]
    values = [r["bytes"]["activations"][r["policy"]] / 1e9 for r in table]
    ax.barh(names, values, left=left, label="activations (peak, policy shown)")
    ax.set_xlabel("estimated peak per GPU (GB)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("fastcog plan: estimated peak memory per recipe (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import diffusers
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path without extension (.md, .json and .png written)")
    args = parser.parse_args()
    table = rows()
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "command": "python bench/plan_table.py --out " + args.out}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": table, "published": PUBLISHED}, indent=1))
    out.with_suffix(".md").write_text(markdown(table, meta))
    plot(table, out.with_suffix(".png"))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
