"""The path plan: the reference, then the rows --rows names, in that order.

A switch is one way the fastcog path differs from the reference path: a fast-path setting
(``fast.*``), ``train.activation_checkpointing``, ``optim.name`` / ``optim.fused`` /
``optim.cpu_offload``, or the frozen weights' storage dtype (key ``frozen_storage``; the reference
stores them in fp32). Rows:

* ``fastcog``        the fastcog path
* ``selective``      the fastcog path with train.activation_checkpointing=selective (``auto`` picks
                     by the GPU's memory, so the headline may run a policy a smaller GPU could not)
* ``leave-one-out``  one row per switch: the fastcog path with that switch back at the reference's value
* ``add-one``        one row per switch: the reference path with that switch on
* ``-KEY`` / ``+KEY`` one leave-one-out / add-one row

The headline row (the exit status, the top-level parity and speedup) is ``fastcog`` when listed,
else the first ``selective`` row, else none: leave-one-out and add-one rows are diagnostics, each
with its own parity in its entry.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from .common import UsageError
from .config import PARAMETER_FIELDS, reference_config

if TYPE_CHECKING:
    from fastcog.config import Config

Change = dict[str, dict[str, Any]]
"""{section: {key: value}} applied to a Config."""

STORAGE_KEY = "frozen_storage"
ROW_GROUPS = ("fastcog", "selective", "leave-one-out", "add-one")
DEFAULT_ROWS = ("fastcog",)
ABLATION_ROWS = ("fastcog", "leave-one-out")
ROLES = ("reference", "fastcog", "selective", "leave-one-out", "add-one")
MAIN_ROLES = ("reference", "fastcog")
SELECTIVE_NEEDS = "selective keeps fastcog's attention outputs"


@dataclass
class PathSpec:
    name: str
    role: str
    """One of ROLES."""
    switches: tuple[str, ...]
    """What differs from the reference path, as section.key=value."""
    cfg: Config
    frozen_dtype: str
    """Storage dtype of the frozen base weights (the reference: fp32)."""
    steps: int


@dataclass(frozen=True)
class Switch:
    key: str
    """section.key, or STORAGE_KEY."""
    label: str
    """The switch as the fastcog config turns it on: "fast.fp8=rowwise", "frozen weights stored in bf16"."""
    on: Change
    """Turning it on in the reference config."""
    off: Change
    """Setting it back to the reference's value in the fastcog config."""


def switch_keys() -> tuple[str, ...]:
    """Every key a switch can have, whether or not a given config turns it on."""
    from fastcog.config import FastConfig

    fast = tuple(f"fast.{f.name}" for f in dataclasses.fields(FastConfig) if f.name not in PARAMETER_FIELDS)
    return (STORAGE_KEY, *fast, "train.activation_checkpointing", "optim.name", "optim.fused", "optim.cpu_offload")


def switches(ref: Config, cfg: Config, frozen_dtype: str) -> list[Switch]:
    """Each switch `cfg` (with frozen weights stored in `frozen_dtype`) turns on relative to `ref`."""
    out: list[Switch] = []
    if frozen_dtype != "fp32":
        out.append(Switch(STORAGE_KEY, f"frozen weights stored in {frozen_dtype}", {}, {}))
    for f in dataclasses.fields(cfg.fast):
        value, ref_value = getattr(cfg.fast, f.name), getattr(ref.fast, f.name)
        if f.name not in PARAMETER_FIELDS and value != ref_value:
            out.append(Switch(f"fast.{f.name}", f"fast.{f.name}={yaml_value(value)}", {"fast": {f.name: value}},
                              {"fast": {f.name: ref_value}}))
    ac, ref_ac = cfg.train.activation_checkpointing, ref.train.activation_checkpointing
    if ac != ref_ac:
        out.append(Switch("train.activation_checkpointing", f"train.activation_checkpointing={ac}",
                          {"train": {"activation_checkpointing": ac}}, {"train": {"activation_checkpointing": ref_ac}}))
    for key in ("name", "fused", "cpu_offload"):
        value, ref_value = getattr(cfg.optim, key), getattr(ref.optim, key)
        if value != ref_value:
            out.append(Switch(f"optim.{key}", f"optim.{key}={yaml_value(value)}", {"optim": {key: value}},
                              {"optim": {key: ref_value}}))
    return out


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def apply(cfg: Config, change: Change) -> Config:
    for section, values in change.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def parse_rows(text: str) -> tuple[str, ...]:
    """--rows' items, checked against every possible switch key (the config decides which are on later)."""
    items = tuple(item.strip() for item in text.split(","))
    keys = switch_keys()
    for item in items:
        if item not in ROW_GROUPS and not (item[:1] in ("-", "+") and item[1:] in keys):
            raise UsageError(f"--rows: unknown row {item!r}: give {', '.join(ROW_GROUPS)}, -KEY or +KEY with KEY "
                             f"one of {', '.join(keys)}")
    return items


def plan_paths(cfg: Config, fast_cfg: Config, args: argparse.Namespace, steps: int) -> list[PathSpec]:
    """The reference, then every row of args.rows in the order given (a row named twice runs once)."""
    ref = reference_config(cfg)
    fast_dtype = fast_cfg.model.dtype
    on = switches(ref, fast_cfg, fast_dtype)
    extra = tuple(f"(fast-only) {s}" for s in args.fast_only_set)
    row_steps = args.ablation_steps or steps

    def row(name: str, role: str, row_cfg: Config, dtype: str) -> PathSpec:
        labels = tuple(s.label for s in switches(ref, row_cfg, dtype))
        return PathSpec(name, role, labels + extra, row_cfg, dtype, steps if role in MAIN_ROLES else row_steps)

    def leave_out(s: Switch) -> PathSpec:
        row_cfg, note = apply(fast_cfg, s.off), ""
        if row_cfg.train.activation_checkpointing == "selective" and row_cfg.fast.attention == "reference":
            row_cfg = apply(row_cfg, {"train": {"activation_checkpointing": ref.train.activation_checkpointing}})
            note = f" (and train.activation_checkpointing={ref.train.activation_checkpointing}: {SELECTIVE_NEEDS})"
        return row(f"fastcog - {s.key}{note}", "leave-one-out", row_cfg, "fp32" if s.key == STORAGE_KEY else fast_dtype)

    def add(s: Switch) -> PathSpec:
        row_cfg, label = apply(ref, s.on), s.label
        if row_cfg.train.activation_checkpointing == "selective" and row_cfg.fast.attention == "reference":
            row_cfg = apply(row_cfg, {"fast": {"attention": fast_cfg.fast.attention}})
            label += f" + fast.attention={fast_cfg.fast.attention}"
        dtype = fast_dtype if s.key == STORAGE_KEY else "fp32"
        return PathSpec(f"reference + {label}", "add-one", (label,), row_cfg, dtype, row_steps)

    def selective() -> PathSpec:
        change: Change = {"train": {"activation_checkpointing": "selective"}}
        note = ""
        if fast_cfg.fast.attention == "reference":
            change["fast"] = {"attention": "auto"}
            note = f" + fast.attention=auto ({SELECTIVE_NEEDS})"
        return row(f"fastcog, selective checkpointing{note}", "selective", apply(fast_cfg, change), fast_dtype)

    def one(key: str) -> Switch:
        for s in on:
            if s.key == key:
                return s
        raise UsageError(f"--rows: the fastcog path does not turn {key} on; its switches: "
                         f"{', '.join(s.key for s in on) or 'none'}")

    paths = [PathSpec("reference", "reference", (), ref, "fp32", steps)]
    for item in args.rows:
        if item == "fastcog":
            new = [row("fastcog", "fastcog", fast_cfg, fast_dtype)]
        elif item == "selective":
            new = [selective()]
        elif item == "leave-one-out":
            new = [leave_out(s) for s in on]
        elif item == "add-one":
            new = [add(s) for s in on]
        else:
            new = [(leave_out if item[0] == "-" else add)(one(item[1:]))]
        paths += [p for p in new if p.name not in {q.name for q in paths}]
    return paths


def headline(paths: list[PathSpec]) -> PathSpec | None:
    """The row the exit status, the top-level parity and the speedup follow: fastcog, else the first
    selective row, else none."""
    for role in ("fastcog", "selective"):
        for p in paths:
            if p.role == role:
                return p
    return None
