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
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shapes the variants were released for: 49x480x720 (2B, 5B), 81x768x1360 (1.5).
SHAPES = {"cogvideox-2b": (49, 480, 720), "cogvideox-5b": (49, 480, 720), "cogvideox-5b-i2v": (49, 480, 720),
          "cogvideox1.5-5b": (81, 768, 1360), "cogvideox1.5-5b-i2v": (81, 768, 1360)}


@dataclass(frozen=True)
class Source:
    """Where published figures come from, what they measure, and the settings all of them share, each as
    that source states it (files read at the commits named)."""

    name: str
    where: str
    measure: str
    shared: str


@dataclass(frozen=True)
class Published:
    """One memory figure another trainer publishes for CogVideoX fine-tuning, quoted as published."""

    model: str
    """As the source names it."""
    kind: str
    """lora | sft: the plan table's row kind it stands beside."""
    figure: str
    settings: str
    vs_ours: str
    """How its settings differ from our row's (batch 1, LoRA r128 / alpha 64 or full fine-tuning, bf16, AdamW,
    full checkpointing, one GPU, at the variant's shape); "" where they match as far as the source says."""
    source: Source


REFERENCE = Source(
    "CogVideoX reference fine-tuning (THUDM/CogVideo finetune/)",
    "THUDM/CogVideo finetune/README.md, 'Hardware Requirements' (commit e519ece, 2025-05-14)",
    "GPU memory per GPU; the maintainers test reserved memory (github.com/zai-org/CogVideo/issues/731, 2025-03-03)",
    "batch 1 (the README's launch scripts finetune/train_ddp_*.sh, train_zero_*.sh); LoRA alpha 64, gradient "
    "checkpointing on, AdamW (finetune/schemas/args.py defaults)")
OLD_README = Source(
    "CogVideoX model table (THUDM/CogVideo README.md)",
    "THUDM/CogVideo README.md, 'Fine-tuning Memory Usage' (commit 075fad4, 2024-11-08; removed by the "
    "CogVideoX1.5 update 806a7f6)",
    "'Fine-tuning Memory Usage'; trainer, and allocated or reserved, not stated",
    "720 x 480, 6 s at 8 frames/s (the same table); LoRA rank, optimizer and checkpointing not stated")
COGKIT = Source(
    "CogKit",
    "THUDM/CogKit docs/04-Finetune/01-Prerequisites.mdx (commit 1633285, 2025-05-14), published at "
    "https://thudm.github.io/CogKit/Finetune/Prerequisites",
    "'minimum VRAM requirements' per GPU, 'test on 8xA100'",
    "not in the table, CogKit's defaults: batch 1 and bf16 (quickstart/scripts/t2v/config.yaml), LoRA rank 128 / "
    "alpha 64 on to_q, to_k, to_v, to_out.0 (src/cogkit/utils/lora.py), gradient checkpointing on, AdamW "
    "(src/cogkit/finetune/base/base_args.py)")
FACTORY = Source(
    "cogvideox-factory",
    "a-r-r-o-w/cogvideox-factory README.md, 'Memory requirements' (commit 223add1; tables added 2024-10-04 to 10-09)",
    "column memory_before_validation, 'the true indicator of the peak memory required for training' without "
    "validation (the README); GB = bytes / 1024**3 (training/utils.py print_memory, which prints memory_allocated, "
    "max_memory_allocated and max_memory_reserved; the README does not say which)",
    "train_batch_size 1, gradient_checkpointing True, latents and text embeddings precomputed (no VAE or T5 "
    "loaded); resolution and precision not stated with the tables (the README's command: 49x480x720, bf16)")
FINETRAINERS_DOC = Source(
    "finetrainers",
    "a-r-r-o-w/finetrainers docs/training/cogvideox.md, 'Memory Usage' (tag v0.0.1, commit 41dd338)",
    "max_memory_reserved (memory_allocated in brackets) after epoch 1, GB = bytes / 1024**3 "
    "(finetrainers/utils/memory_utils.py)",
    "batch 1, gradient checkpointing, AdamW, 49x480x720, conditions and latents precomputed, torch.bfloat16 (stated "
    "for the LoRA figure); the page's command trains THUDM/CogVideoX-5b")
FINETRAINERS_README = Source(
    "finetrainers (README)",
    "a-r-r-o-w/finetrainers README.md, support matrix (main, commit f476c37, 2025-06-04; 'obtained from the "
    "release branch' v0.0.1)",
    "'Min. LoRA VRAM' / 'Min. Full Finetuning VRAM', training only, no validation",
    "49x512x768, pre-computation, gradient checkpointing; batch size not stated")
DIFFUSERS = Source(
    "diffusers example (examples/cogvideo/train_cogvideox_lora.py)",
    "huggingface/diffusers examples/cogvideo/README.md (commit 0e1c569)",
    "'the memory required by the training script' when LoRA support was added",
    "LoRA tested on CogVideoX-2b only; the README's command: fp16, 49x480x720, batch 1, Adam, no gradient "
    "checkpointing flag")

# Other trainers' published memory figures for CogVideoX fine-tuning on one GPU, grouped by source. Left out:
# figures for several GPUs (per-GPU figures of 8-GPU ZeRO / FSDP runs) and batch sizes above 1.
PUBLISHED: list[Published] = [
    Published("cogvideox-t2v-2b", "lora", "16GB VRAM (NVIDIA 4080)", "LoRA rank 128, DDP, fp16, 49x480x720",
              "fp16", REFERENCE),
    Published("cogvideox-{t2v, i2v}-5b", "lora", "24GB VRAM (NVIDIA 4090)", "LoRA rank 128, DDP, bf16, 49x480x720",
              "", REFERENCE),
    Published("cogvideox1.5-{t2v, i2v}-5b", "lora", "35GB VRAM (NVIDIA A100)",
              "LoRA rank 128, DDP, bf16, 81x768x1360", "", REFERENCE),
    Published("cogvideox-t2v-2b", "sft", "36GB VRAM (NVIDIA A100)", "sft, DDP, fp16, 49x480x720", "fp16", REFERENCE),
    Published("cogvideox-t2v-2b", "sft", "17GB VRAM (NVIDIA 4090)",
              "sft, 1-GPU zero-2 + opt offload, fp16, 49x480x720",
              "DeepSpeed ZeRO-2 keeps the optimizer state on the CPU; fp16", REFERENCE),
    Published("cogvideox-{t2v, i2v}-5b", "sft", "42GB VRAM (NVIDIA A100)",
              "sft, 1-GPU zero-2 + opt offload, bf16, 49x480x720",
              "DeepSpeed ZeRO-2 keeps the optimizer state on the CPU", REFERENCE),
    Published("cogvideox1.5-{t2v, i2v}-5b", "sft", "56GB VRAM (NVIDIA A100)",
              "sft, 1-GPU zero-2 + opt offload, bf16, 81x768x1360",
              "DeepSpeed ZeRO-2 keeps the optimizer state on the CPU", REFERENCE),
    Published("CogVideoX-2B", "lora", "47 GB", "bs=1, LORA, FP16", "fp16; rank not stated", OLD_README),
    Published("CogVideoX-2B", "sft", "62GB", "bs=1, SFT, FP16", "fp16", OLD_README),
    Published("CogVideoX-5B", "lora", "63 GB", "bs=1, LORA, BF16", "rank not stated", OLD_README),
    Published("CogVideoX-5B", "sft", "75GB", "bs=1, SFT, BF16", "", OLD_README),
    Published("CogVideoX-5B-I2V", "lora", "78 GB", "bs=1, LORA, BF16", "rank not stated", OLD_README),
    Published("cogvideox-t2v-2b", "lora", "1 GPU with 12GB VRAM", "lora, DDP, 49x480x720", "", COGKIT),
    Published("cogvideox-t2v-2b", "sft", "1 GPU with 25GB VRAM", "sft, DDP, 49x480x720", "", COGKIT),
    Published("cogvideox-{t2v,i2v}-5b", "lora", "1 GPU with 24GB VRAM", "lora, DDP, 49x480x720", "", COGKIT),
    Published("cogvideox-{t2v,i2v}-5b", "sft", "1 GPU with 16GB VRAM", "sft, FSDP fullshard + offload, 49x480x720",
              "parameters and gradients offloaded to the CPU (offload_params_grads)", COGKIT),
    Published("cogvideox1.5-{t2v,i2v}-5b", "lora", "1 GPU with 32GB VRAM", "lora, DDP, 81x768x1360", "", COGKIT),
    Published("THUDM/CogVideoX-2b", "lora", "13.035", "lora rank 64, AdamW", "rank 64", FACTORY),
    Published("THUDM/CogVideoX-2b", "lora", "13.095", "lora rank 256, AdamW", "rank 256", FACTORY),
    Published("THUDM/CogVideoX-5b", "lora", "20.818", "lora rank 64, AdamW", "rank 64", FACTORY),
    Published("THUDM/CogVideoX-5b", "lora", "22.119", "lora rank 256, AdamW", "rank 256", FACTORY),
    Published("THUDM/CogVideoX-2b", "sft", "33.934", "full finetuning, AdamW", "", FACTORY),
    Published("THUDM/CogVideoX-5b", "sft", "OOM", "full finetuning, AdamW", "GPU not stated", FACTORY),
    Published("THUDM/CogVideoX-5b", "sft", "52.826", "full finetuning, AdamW (8-bit bitsandbytes)",
              "8-bit optimizer state", FACTORY),
    Published("THUDM/CogVideoX-5b", "sft", "39.359",
              "full finetuning, AdamW + CPUOffloadOptimizer (with gradient offloading)",
              "optimizer state and gradients on the CPU (torchao)", FACTORY),
    Published("CogVideoX-5b (132,120,576 trainable parameters)", "lora", "20.701 (11.145)",
              "LoRA rank 128", "", FINETRAINERS_DOC),
    Published("CogVideoX-5b (5,570,283,072 trainable parameters)", "sft", "52.939 (31.160)",
              "full finetuning, train batch size 1", "settings besides the batch not restated for this figure",
              FINETRAINERS_DOC),
    Published("CogVideoX-5b", "lora", "18 GB", "Text-to-Video, rank 128, FP8 weights",
              "49x512x768; frozen weights in FP8", FINETRAINERS_README),
    Published("CogVideoX-5b", "sft", "53 GB", "Text-to-Video, BF16 weights", "49x512x768", FINETRAINERS_README),
    Published("CogVideoX-2b", "lora", "~52 GB", "LoRA rank 64, VAE tiling, the simplest accelerate config",
              "rank 64, fp16, Adam, no checkpointing in the command", DIFFUSERS),
    Published("CogVideoX-2b", "lora", "~46 GB",
              "LoRA rank 64, VAE tiling, the simplest accelerate DeepSpeed ZeRO-2 config",
              "rank 64, fp16, Adam, no checkpointing in the command; ZeRO-2", DIFFUSERS),
]
RECIPE_GPU = {"t2v_5b_lowmem": "rtx4090", "t2v_1.5_lowmem": "rtx4090"}  # the card a recipe is for; else h100-80gb


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
        "optimizer state from the registry; activations and one block backward's working set from one block run",
        "on fake tensors under CUDA's autocast rules, the flash-attention op standing in for the GPU's fused",
        "attention), at each variant's released shape, batch 1.",
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
    return "\n".join(lines + published_markdown()) + "\n"


def published_markdown() -> list[str]:
    """PUBLISHED under the table, one section per source: their figures as published, not fastcog's."""
    lines = [
        "", "## Published by others", "",
        "Other trainers' own memory figures for CogVideoX fine-tuning on one GPU, quoted as published with their",
        "settings and sources: not fastcog estimates, not measured here. Each is its source's own measure and unit",
        "(the fastcog figures above are estimated allocated bytes, GB = 1e9). \"vs ours\" says how the settings",
        "differ from the matching row above (batch 1, LoRA r128 / alpha 64 or full fine-tuning, bf16, AdamW, full",
        "checkpointing, one GPU, 49x480x720 or 81x768x1360); \"-\" where they match as far as the source says.",
    ]
    for source, entries in groupby(PUBLISHED, key=lambda p: p.source):
        lines += ["", f"### {source.name}", "", f"- source: {source.where}", f"- measure: {source.measure}",
                  f"- settings of every figure: {source.shared}", "",
                  "| their model | kind | figure | settings | vs ours |", "|---|---|---|---|---|"]
        lines += [f"| {p.model} | {p.kind} | {p.figure} | {p.settings} | {p.vs_ours or '-'} |" for p in entries]
    return lines


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
    published = [dataclasses.asdict(p) for p in PUBLISHED]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": table, "published": published}, indent=1))
    out.with_suffix(".md").write_text(markdown(table, meta))
    plot(table, out.with_suffix(".png"))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
