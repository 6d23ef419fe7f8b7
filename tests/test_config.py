"""Config: YAML -> frozen dataclasses, reference defaults, errors that say what to change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fastcog.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
    to_dict,
)
from fastcog.errors import ConfigError, FastcogError
from tests.raw_configs import MINIMAL, with_

REPO = Path(__file__).resolve().parents[1]

# The smallest config that validates: only the two paths have no usable default.
def write_yaml(tmp_path: Path, raw: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------
# Parsing and defaults
# ------------------------------------------------------------------------------------------


def test_yaml_becomes_frozen_dataclasses(tmp_path: Path) -> None:
    raw = with_(MINIMAL, optim={"lr": 3.0e-3}, lora={"rank": 8, "target_modules": ["to_q", "to_v"]})
    cfg = load_config(write_yaml(tmp_path, raw))
    assert cfg.model.path == "ckpt" and cfg.data.data_root == "clips"
    assert cfg.optim.lr == pytest.approx(3e-3)
    assert cfg.lora.rank == 8
    assert cfg.lora.target_modules == ("to_q", "to_v")  # lists become (hashable) tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = cfg.optim  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 2  # type: ignore[misc]


def test_defaults_are_the_reference_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    assert cfg.lora.rank == 128
    assert cfg.lora.alpha == 64
    assert cfg.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    o = cfg.optim
    assert o.name == "adamw"
    assert o.lr == 2e-5
    assert o.betas == (0.9, 0.95)
    assert o.eps == 1e-8
    assert o.weight_decay == 1e-4
    assert o.max_grad_norm == 1.0
    assert o.lr_scheduler == "constant_with_warmup"
    assert o.lr_warmup_steps == 100
    assert cfg.checkpoint.every_steps == 200
    assert cfg.checkpoint.limit == 10
    assert cfg.checkpoint.resume_from is None  # never resumes unless asked
    assert cfg.train.activation_checkpointing == "full"
    assert cfg.validation.every_steps == 0
    assert cfg.validation.num_inference_steps == 50 and cfg.validation.guidance_scale == 6.0
    # Nothing but the two paths differs from the dataclass defaults.
    assert cfg == dataclasses.replace(
        Config(),
        model=dataclasses.replace(Config().model, path="ckpt"),
        data=dataclasses.replace(Config().data, data_root="clips"),
    )


def test_empty_sections_and_empty_file_give_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, {**MINIMAL, "optim": None, "lora": {}}))
    assert cfg.optim == Config().optim and cfg.lora == Config().lora
    assert config_from_dict({}) == Config()


def test_exponent_without_dot_is_read_as_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads `2e-5` (no dot) as a string; a float field must still accept it.
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {path: ckpt}\ndata: {data_root: clips}\noptim: {lr: 2e-5, eps: 1e-8}\n")
    cfg = load_config(path)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 2e-5
    assert cfg.optim.eps == 1e-8


def test_int_for_float_field_becomes_float(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, with_(MINIMAL, lora={"alpha": 16})))
    assert isinstance(cfg.lora.alpha, float) and cfg.lora.alpha == 16.0


def test_demo_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.create_tiny == "cogvideox-5b"
    assert cfg.data.num_frames == 9 and (cfg.data.height, cfg.data.width) == (64, 96)


# ------------------------------------------------------------------------------------------
# Unknown names and wrong types
# ------------------------------------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, with_(MINIMAL, optim={"lrr": 1e-4})))
    msg = str(err.value)
    assert "optim.lrr" in msg
    assert "'lr'" in msg


def test_unknown_key_closest_match_in_another_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.train_step\b.*'train_steps'"):
        load_config(write_yaml(tmp_path, with_(MINIMAL, train={"train_step": 5})))


def test_unknown_key_without_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"log": {"zzzzzz": 1}})
    msg = str(err.value)
    assert "log.zzzzzz" in msg
    for key in ("report_to", "tracker_name", "progress_bar"):
        assert key in msg


def test_unknown_section_names_it_and_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, {**MINIMAL, "optimizer": {"lr": 1e-4}}))
    msg = str(err.value)
    assert "optimizer" in msg and "'optim'" in msg


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "seed", "abc", "integer"),
        ("train", "seed", 1.5, "integer"),
        ("train", "batch_size", True, "integer"),  # a bool is not an int here
        ("data", "num_frames", "49", "integer"),
        ("log", "progress_bar", "yes", "true or false"),
        ("log", "progress_bar", 1, "true or false"),
        ("optim", "lr", "fast", "number"),
        ("optim", "lr", [1.0], "number"),
        ("model", "path", 5, "string"),
        ("model", "create_tiny", 5, "string"),  # Optional[str] still checks the str
        ("train", "train_steps", "ten", "integer"),  # Optional[int]
        ("optim", "betas", [0.9], "2 values"),
        ("optim", "betas", [0.9, "x"], "number"),
        ("lora", "target_modules", 5, "list"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(section, key, value, expected) -> None:
    raw = with_(MINIMAL, **{section: {key: value}})
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    msg = str(err.value)
    assert f"{section}.{key}" in msg
    assert expected in msg


def test_single_string_for_a_list_field_is_a_one_element_list() -> None:
    cfg = config_from_dict(with_(MINIMAL, lora={"target_modules": "to_q"}))
    assert cfg.lora.target_modules == ("to_q",)


def test_missing_config_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_top_level_not_a_mapping_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict(["model", "data"])  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["model: [a, b]\n", "model: ckpt\n", "- model\n- data\n"])
def test_non_mapping_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(FastcogError, match="mapping"):
        load_config(path)


# ------------------------------------------------------------------------------------------
# --set overrides
# ------------------------------------------------------------------------------------------


def test_apply_overrides_parses_values_as_yaml() -> None:
    raw = {"train": {"seed": 1}, "optim": None}
    out = apply_overrides(
        raw,
        [
            "train.seed=7",
            "optim.lr=1.0e-3",
            "lora.target_modules=[to_q, ff.net.0.proj]",
            "checkpoint.limit=null",
            "train.train_steps=",
            "log.report_to=none",
            "model.path=a=b",  # only the first '=' splits
        ],
    )
    assert out["train"]["seed"] == 7
    assert out["optim"]["lr"] == 1e-3
    assert out["lora"]["target_modules"] == ["to_q", "ff.net.0.proj"]
    assert out["checkpoint"]["limit"] is None
    assert out["train"]["train_steps"] is None
    assert out["log"]["report_to"] == "none"  # the string, not YAML null
    assert out["model"]["path"] == "a=b"
    assert raw == {"train": {"seed": 1}, "optim": None}  # the input is not modified


def test_load_config_with_overrides(tmp_path: Path) -> None:
    raw = with_(MINIMAL, train={"train_steps": 100, "seed": 3}, checkpoint={"limit": 4})
    path = write_yaml(tmp_path, raw)
    cfg = load_config(
        path,
        [
            "train.train_steps=10",
            "lora.target_modules=[to_q,to_k]",
            "checkpoint.limit=null",
            "optim.betas=[0.8, 0.99]",
            "log.progress_bar=false",
        ],
    )
    assert cfg.train.train_steps == 10
    assert cfg.train.seed == 3  # untouched keys of an overridden section survive
    assert cfg.lora.target_modules == ("to_q", "to_k")
    assert cfg.checkpoint.limit is None
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.log.progress_bar is False
    # Overrides are validated like the file.
    with pytest.raises(ConfigError, match="num_frames"):
        load_config(path, ["data.num_frames=10"])


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train_steps=10", "section.key=value"),
        ("train.train_steps", "section.key=value"),
        ("trian.seed=1", "'train'"),
    ],
)
def test_malformed_overrides(item: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, [item])
    assert expected in str(err.value)
    assert item in str(err.value)


def test_override_of_unknown_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, MINIMAL), ["optim.lrr=1"])
    assert "optim.lrr" in str(err.value) and "'lr'" in str(err.value)


def test_override_with_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.seed.*integer"):
        load_config(write_yaml(tmp_path, MINIMAL), ["train.seed=abc"])


# ------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    raw = with_(
        MINIMAL,
        model={"create_tiny": "cogvideox-5b", "dtype": "fp32"},
        data={"num_frames": 17, "height": 64, "width": 96, "image_column": None},
        lora={"rank": 4, "alpha": 8, "target_modules": ["to_q", "ff.net.2"]},
        optim={"lr": 2e-5, "betas": [0.8, 0.9], "lr_scheduler": "piecewise_constant", "lr_step_rules": "1:10,0.1"},
        train={"train_steps": 3},
        checkpoint={"every_steps": 1, "limit": None, "resume_from": "latest"},
        validation={"every_steps": 2, "prompts": ["a red ball"], "images": ["x.png"]},
    )
    cfg = load_config(write_yaml(tmp_path, raw))
    saved = tmp_path / "resolved.yaml"
    save_config(cfg, saved)
    assert load_config(saved) == cfg
    # Every field is written out, not just the non-defaults.
    written = yaml.safe_load(saved.read_text())
    assert written == to_dict(cfg)
    assert set(written["optim"]) == {f.name for f in dataclasses.fields(cfg.optim)}


def test_demo_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    save_config(cfg, tmp_path / "demo.yaml")
    assert load_config(tmp_path / "demo.yaml") == cfg
