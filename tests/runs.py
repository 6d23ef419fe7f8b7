"""Helpers shared by the test modules that train the tiny model in this process (test modules never
import each other: what several of them need lives here or in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_cfg(model_path: Path, data_root: Path, out: Path, **sections):
    """A validated config of a short fp32 LoRA run on the tiny model; `sections` update the defaults."""
    from fastcog.config import config_from_dict, validate

    raw = {
        "model": {"path": str(model_path), "dtype": "fp32"},
        "data": {"data_root": str(data_root), "num_frames": 9, "height": 64, "width": 96,
                 "cache_dir": str(data_root / "cache")},
        "lora": {"rank": 4, "alpha": 8},
        "optim": {"lr": 1e-3, "lr_warmup_steps": 2},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "train_steps": 4,
                  "activation_checkpointing": "none"},
        "checkpoint": {"every_steps": 2, "limit": 10},
        # No end-of-run plot: ~0.3 s of matplotlib per run (test_trainer's first test turns it on).
        "log": {"report_to": "none", "progress_bar": False, "plot": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def copy_session_cache(model_path: Path, clips: Path, cache: Path) -> None:
    """Fill `cache` with copies of the session's cached latents and prompt embeddings of `clips` for
    make_cfg's runs (clips/cache: encoded once per session, by the first run that needs them, which may be
    this one): a private cache, complete for those runs, that a test may change or lock without encoding
    the clips again."""
    from fastcog.inputs import check_inputs, prepare_dataset

    cfg = make_cfg(model_path, clips, cache.parent / "session-cache-run")
    variant, samples = check_inputs(cfg, training=False)
    prepare_dataset(cfg, samples, variant, torch.device("cpu"))
    for folder in ("latents", "prompts"):
        shutil.copytree(clips / "cache" / folder, cache / folder, dirs_exist_ok=True)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def tiny_lora_transformer(model_path) -> torch.nn.Module:
    """The tiny bf16 CogVideoX at ``model_path`` with rank-4 LoRA and nonzero (seeded) lora_B.

    Used by tests/test_fp8.py and by the torchrun worker in tests/fp8_runs.py."""
    from fastcog.config import LoraConfig
    from fastcog.lora import inject_lora
    from fastcog.models import load_components

    transformer = load_components(model_path, "bf16", parts=("transformer",)).transformer
    inject_lora(transformer, LoraConfig(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(50)
    with torch.no_grad():  # B = 0 at init would make every LoRA gradient but dB zero
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer
