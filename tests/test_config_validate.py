"""validate(): allowed values from the Literal annotations, combinations that cannot train, and the
rules that need the detected variant; each error says what to change."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from fastcog.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    LR_SCHEDULES,
    OPTIMIZERS,
    config_from_dict,
    load_config,
    validate,
    validate_for_variant,
)
from fastcog.config_schema import SECTIONS
from fastcog.config_validate import literal_values
from fastcog.errors import ConfigError
from fastcog.optimizers import OPTIMIZER_SPECS
from fastcog.variants import FULL_TRANSFORMER_CONFIGS, VARIANTS, detect_variant
from tests.raw_configs import MINIMAL, with_


def spec(variant: str):
    return detect_variant(FULL_TRANSFORMER_CONFIGS[variant])


# ------------------------------------------------------------------------------------------
# validate(): combinations that cannot train
# ------------------------------------------------------------------------------------------


def check(raw: dict) -> None:
    validate(config_from_dict(raw))


def test_minimal_config_validates() -> None:
    check(MINIMAL)


@pytest.mark.parametrize(
    ("frames", "suggest"),
    [(10, "use 9 or 17"), (48, "use 41 or 49"), (50, "use 49 or 57"), (0, "use 1 or 9")],
)
def test_frames_not_8n_plus_1(frames: int, suggest: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(with_(MINIMAL, data={"num_frames": frames}))
    msg = str(err.value)
    assert f"data.num_frames={frames}" in msg and "8N+1" in msg
    assert suggest in msg


@pytest.mark.parametrize("frames", [1, 9, 49, 81])
def test_frames_8n_plus_1_are_accepted(frames: int) -> None:
    check(with_(MINIMAL, data={"num_frames": frames}))


@pytest.mark.parametrize(
    ("key", "value", "suggest"),
    [("height", 470, "use 464"), ("width", 100, "use 96"), ("height", 0, "use 16"), ("width", -32, "use 16")],
)
def test_height_width_not_multiple_of_16(key: str, value: int, suggest: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(with_(MINIMAL, data={key: value}))
    msg = str(err.value)
    assert f"data.{key}={value}" in msg and "multiple of 16" in msg
    assert suggest in msg


def test_validation_interval_must_be_multiple_of_checkpoint_interval() -> None:
    raw = with_(MINIMAL, checkpoint={"every_steps": 200}, validation={"every_steps": 300, "prompts": ["a cat"]})
    with pytest.raises(ConfigError) as err:
        check(raw)
    msg = str(err.value)
    assert "validation.every_steps=300" in msg and "checkpoint.every_steps=200" in msg
    assert "use 200" in msg
    check(with_(raw, validation={"every_steps": 400}))


@pytest.mark.parametrize(("sections", "message"), [
    ({"data": {"validation_fraction": 1.0}}, r"data.validation_fraction=1.0: must be at least 0 and below 1"),
    ({"data": {"validation_fraction": -0.1}}, r"data.validation_fraction=-0.1: must be at least 0"),
    ({"data": {"validation_fraction": 0.1, "validation_metadata_file": "val.csv"}},
     r"data.validation_fraction and data.validation_metadata_file are both set"),
    ({"data": {"validation_caption_column": "val_prompts.txt"}},
     r"data.validation_caption_column is set but data.validation_video_column is not"),
    ({"data": {"validation_image_column": "val_images.txt"}}, r"data.validation_image_column is set without"),
    ({"validation": {"loss_every_steps": 10}}, r"validation.loss_every_steps=10 needs a held-out set: set "
                                                r"data.validation_fraction"),
    ({"validation": {"loss_every_steps": -1}}, r"validation.loss_every_steps=-1: must be >= 0"),
    ({"data": {"validation_fraction": 0.1}, "validation": {"loss_quantiles": [0.5, 1.0]}},
     r"validation.loss_quantiles=\[0.5, 1.0\]: .* each at least 0 and below 1"),
])
def test_heldout_set_and_validation_loss(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(with_(MINIMAL, **sections))


def test_heldout_set_and_validation_loss_accepted() -> None:
    check(with_(MINIMAL, data={"validation_fraction": 0.05}, validation={"loss_every_steps": 100}))
    check(with_(MINIMAL, data={"validation_caption_column": "p.txt", "validation_video_column": "v.txt"},
                validation={"loss_every_steps": 100}))


def test_validation_without_prompts() -> None:
    with pytest.raises(ConfigError, match=r"validation\.prompts.*add prompts"):
        check(with_(MINIMAL, validation={"every_steps": 200}))


def test_validation_images_must_match_prompts() -> None:
    raw = with_(MINIMAL, validation={"every_steps": 200, "prompts": ["a", "b"], "images": ["a.png"]})
    with pytest.raises(ConfigError, match="one image per prompt"):
        check(raw)


def test_piecewise_constant_needs_step_rules() -> None:
    raw = with_(MINIMAL, optim={"lr_scheduler": "piecewise_constant"})
    with pytest.raises(ConfigError, match=r"optim\.lr_step_rules"):
        check(raw)
    check(with_(raw, optim={"lr_step_rules": "1:10,0.1"}))


def test_unknown_choice_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        check(with_(MINIMAL, optim={"lr_scheduler": "cosin"}))
    assert "optim.lr_scheduler='cosin'" in str(err.value) and "'cosine'" in str(err.value)
    with pytest.raises(ConfigError, match="model.dtype"):
        check(with_(MINIMAL, model={"dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="model.create_tiny"):
        check(with_(MINIMAL, model={"create_tiny": "cogvideox-9b"}))
    with pytest.raises(ConfigError, match="log.report_to"):
        check(with_(MINIMAL, log={"report_to": "wandbb"}))


# Every field annotated Literal[...] (also `Literal[...] | None`), with its allowed values.
CHOICE_FIELDS = {
    f"{name}.{key}": values
    for name, cls in SECTIONS.items()
    for key, tp in typing.get_type_hints(cls).items()
    if (values := literal_values(tp)) is not None
}


def test_fixed_choice_fields_are_literal_annotated() -> None:
    """The string fields that accept a fixed set carry it in their annotation, the only check there is."""
    assert set(CHOICE_FIELDS) == {
        "model.variant", "model.dtype", "model.training_type", "model.create_tiny", "model.i2v_image_scale",
        "data.sampling", "data.resize", "data.latent_mode", "optim.name", "optim.lr_scheduler",
        "train.activation_checkpointing", "fast.attention", "fast.fp8", "fast.lora_kernel", "parallel.strategy",
        "log.report_to",
    }
    # The exported name lists are the annotations' values, which come from their owners.
    assert CHOICE_FIELDS["model.dtype"] == DTYPES == ("fp32", "bf16", "fp16")
    assert CHOICE_FIELDS["optim.name"] == OPTIMIZERS == tuple(OPTIMIZER_SPECS)
    assert CHOICE_FIELDS["optim.lr_scheduler"] == LR_SCHEDULES
    assert CHOICE_FIELDS["fast.attention"] == ATTENTION_BACKENDS
    assert CHOICE_FIELDS["model.variant"] == ("auto", *VARIANTS)
    assert CHOICE_FIELDS["model.create_tiny"] == VARIANTS


def test_lr_schedules_are_names_diffusers_accepts() -> None:
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("field", sorted(CHOICE_FIELDS))
def test_literal_field_rejects_a_value_outside_its_annotation(field: str) -> None:
    section, key = field.split(".")
    with pytest.raises(ConfigError) as err:
        config_from_dict(with_(MINIMAL, **{section: {key: "no-such-value"}}))
    msg = str(err.value)
    assert f"{field}='no-such-value' is not one of" in msg
    assert all(repr(value) in msg for value in CHOICE_FIELDS[field])
    # every allowed value loads
    for value in CHOICE_FIELDS[field]:
        config_from_dict(with_(MINIMAL, **{section: {key: value}}))


@pytest.mark.parametrize(
    ("field", "typo", "suggestion"),
    [("fast.attention", "flsh", "'flash'"), ("optim.name", "adamw4bits", "'adamw4bit'"),
     ("train.activation_checkpointing", "selectiv", "'selective'"), ("model.dtype", "bf61", "'bf16'")],
)
def test_literal_field_suggests_the_closest_value(field: str, typo: str, suggestion: str) -> None:
    section, key = field.split(".")
    with pytest.raises(ConfigError, match=rf"{field}='{typo}'.*did you mean {suggestion}"):
        config_from_dict(with_(MINIMAL, **{section: {key: typo}}))


def test_literal_field_given_a_yaml_bool_asks_for_a_string(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {path: ckpt}\ndata: {data_root: clips}\nfast: {fp8: off}\n")  # YAML 1.1: off = false
    with pytest.raises(ConfigError, match=r"fast\.fp8=False is not one of \['none', 'tensorwise', 'rowwise'\]: "
                                          "expected a string"):
        load_config(path)


def test_validate_checks_literals_of_a_config_built_in_code() -> None:
    cfg = config_from_dict(MINIMAL)
    bad = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, attention="flsh"))
    with pytest.raises(ConfigError, match=r"fast\.attention='flsh'.*'flash'"):
        validate(bad)
    validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, create_tiny=None)))


def test_model_dtypes_have_one_torch_table() -> None:
    import torch

    from fastcog.models import TORCH_DTYPES
    from fastcog.parallel import mixed_precision_dtype

    assert TORCH_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert tuple(TORCH_DTYPES) == DTYPES
    assert [mixed_precision_dtype(name) for name in DTYPES] == [None, torch.bfloat16, torch.float16]


@pytest.mark.parametrize(("section", "key"), [("model", "path"), ("data", "data_root")])
def test_missing_paths(section: str, key: str) -> None:
    raw = with_(MINIMAL)
    del raw[section][key]
    with pytest.raises(ConfigError, match=rf"{section}\.{key} is not set"):
        check(raw)


@pytest.mark.parametrize(
    ("section", "values", "match"),
    [
        ("lora", {"rank": 0}, r"lora\.rank=0"),
        ("lora", {"target_modules": []}, r"lora\.target_modules is empty"),
        ("optim", {"lr": 0}, r"optim\.lr=0"),
        ("train", {"train_steps": 0}, r"train\.train_steps=0"),
        ("train", {"batch_size": 0}, r"train\.batch_size"),
        ("train", {"train_epochs": 0}, r"train\.train_epochs=0"),
        ("checkpoint", {"limit": 0}, r"checkpoint\.limit"),
        ("checkpoint", {"every_steps": -1}, r"checkpoint\.every_steps"),
    ],
)
def test_out_of_range_values(section: str, values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check(with_(MINIMAL, **{section: values}))


# ------------------------------------------------------------------------------------------
# validate_for_variant(): rules that need the detected variant
# ------------------------------------------------------------------------------------------


def test_i2v_validation_needs_images() -> None:
    raw = with_(MINIMAL, validation={"every_steps": 200, "prompts": ["a cat"]})
    cfg = config_from_dict(raw)
    validate(cfg)  # fine without knowing the variant
    with pytest.raises(ConfigError) as err:
        validate_for_variant(cfg, spec("cogvideox1.5-5b-i2v"))
    assert "cogvideox1.5-5b-i2v" in str(err.value) and "validation.images" in str(err.value)
    validate_for_variant(cfg, spec("cogvideox1.5-5b"))  # T2V needs no images
    with_images = config_from_dict(with_(raw, validation={"images": ["cat.png"]}))
    validate_for_variant(with_images, spec("cogvideox1.5-5b-i2v"))


def test_explicit_variant_mismatch() -> None:
    cfg = config_from_dict(with_(MINIMAL, model={"variant": "cogvideox-2b"}))
    with pytest.raises(ConfigError) as err:
        validate_for_variant(cfg, spec("cogvideox-5b"))
    msg = str(err.value)
    assert "model.variant='cogvideox-2b'" in msg and "'cogvideox-5b'" in msg and "auto" in msg
    validate_for_variant(cfg, spec("cogvideox-2b"))
    validate_for_variant(config_from_dict(MINIMAL), spec("cogvideox-5b"))  # auto accepts any


def test_image_column_on_t2v_is_an_error() -> None:
    cfg = config_from_dict(with_(MINIMAL, data={"image_column": "images.txt"}))
    with pytest.raises(ConfigError, match=r"data\.image_column.*text-to-video"):
        validate_for_variant(cfg, spec("cogvideox-5b"))
    validate_for_variant(cfg, spec("cogvideox1.5-5b-i2v"))


def test_learned_positional_embeddings_fix_the_resolution() -> None:
    variant = spec("cogvideox-5b-i2v")  # sample 60x90 latents -> 480x720 pixels
    with pytest.raises(ConfigError) as err:
        validate_for_variant(config_from_dict(with_(MINIMAL, data={"height": 768, "width": 1360})), variant)
    assert "data.height=480" in str(err.value) and "data.width=720" in str(err.value)
    validate_for_variant(config_from_dict(with_(MINIMAL, data={"height": 480, "width": 720})), variant)
