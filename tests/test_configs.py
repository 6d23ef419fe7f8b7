"""Every recipe in configs/ loads and validates, and the H100 recipes train what their names say."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcog.config import load_config, validate_for_variant
from fastcog.variants import FULL_TRANSFORMER_CONFIGS, detect_variant

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# name -> (variant, frames, height, width)
H100_RECIPES = {
    "t2v_h100.yaml": ("cogvideox-5b", 49, 480, 720),
    "t2v_2b_h100.yaml": ("cogvideox-2b", 49, 480, 720),
    "i2v_h100.yaml": ("cogvideox-5b-i2v", 49, 480, 720),
    "t2v_1.5_h100.yaml": ("cogvideox1.5-5b", 81, 768, 1360),
}


def test_the_recipes_are_there():
    assert set(H100_RECIPES) | {"demo.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.data_root


@pytest.mark.parametrize("name", sorted(H100_RECIPES))
def test_h100_recipe_matches_its_name(name):
    variant, frames, height, width = H100_RECIPES[name]
    cfg = load_config(CONFIGS[0].parent / name)
    assert cfg.model.variant in ("auto", variant)
    assert (cfg.data.num_frames, cfg.data.height, cfg.data.width) == (frames, height, width)
    assert (cfg.lora.rank, cfg.train.batch_size, cfg.model.training_type) == (128, 1, "lora")
    # The variant-specific rules (5B-I2V's fixed resolution) hold for the real architecture.
    validate_for_variant(cfg, detect_variant(FULL_TRANSFORMER_CONFIGS[variant]))
