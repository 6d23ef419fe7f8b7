"""Run configuration: YAML in, frozen dataclasses out.

The sections are the dataclasses of fastcog.config_schema (one per section, a docstring per
field); this module reads YAML and `--set` overrides into them. Unknown sections or keys are
errors that name the key and the closest valid one; a value outside a field's `Literal[...]`
annotation is an error that names the key, the allowed values and the closest one.
`validate()` (fastcog.config_validate) rejects combinations that cannot train and says what
to change. Everything is importable from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fastcog.config_schema import (
    ATTENTION_BACKENDS,
    LR_SCHEDULES,
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    FastConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    ValidationConfig,
)
from fastcog.config_validate import check_choice, closest, validate, validate_for_variant
from fastcog.dtypes import DTYPES
from fastcog.errors import ConfigError
from fastcog.optimizers import OPTIMIZER_NAMES as OPTIMIZERS

__all__ = [
    "ATTENTION_BACKENDS", "DTYPES", "LR_SCHEDULES", "OPTIMIZERS",
    "CheckpointConfig", "Config", "DataConfig", "FastConfig", "LogConfig", "LoraConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "TrainConfig", "ValidationConfig",
    "apply_overrides", "config_from_dict", "load_config", "save_config", "to_dict", "validate",
    "validate_for_variant",
]

# Keys that moved: an old config gets told where they went, not just "unknown".
RENAMED = {
    "train.gradient_checkpointing": "train.activation_checkpointing (full = true, none = false)",
    "train.objective": "fast.fused_loss (false = the reference objective)",
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        check_choice(value, tp, where)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if f"{name}.{key}" in RENAMED:
            raise ConfigError(f"config key '{name}.{key}' was renamed: use {RENAMED[f'{name}.{key}']}")
        if key not in hints:
            hint = closest(str(key), valid) or f" (valid keys: {', '.join(valid)})"
            raise ConfigError(f"unknown config key '{name}.{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict (sections of keys); unknown names are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping of sections (model:, data:, ...)")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{closest(str(section), SECTIONS)}")
    return Config(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config dict."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping of sections (model:, data:, ...)")
    out = {k: dict(v) if isinstance(v, dict) else ({} if v is None else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.seed=1")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section '{section}'{closest(section, SECTIONS)}")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {target!r}")
        try:
            target[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it or close "
                              "its brackets, e.g. --set lora.target_modules=[to_q,to_k]") from None
    return out


def yaml_error_line(path: Path, err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: file, line and column (1-based, as editors count), what is wrong."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    if "\\t" in problem or "\t" in problem:  # the scanner: "found character '\\t' that cannot start any token"
        return f"{where}: a tab character; YAML forbids tabs for indentation: use spaces instead"
    return f"{where}: not valid YAML ({problem}): check the indentation, quotes and brackets there"


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides, build and validate it.

    Relative paths in the file (model.path, data.data_root, train.output_dir) are kept as
    written: they are relative to the working directory, like every other CLI path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_line(path, err)) from None
    cfg = config_from_dict(apply_overrides(raw, overrides))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for writing config.yaml."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in SECTIONS
    }


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
