"""What a checkpoint records about its run, and whether a new config may continue from it.

Every checkpoint holds `run.json`: the resolved config, the number of processes, the detected
variant and a fingerprint of the base transformer's files. On resume, `check_resume` compares
them with the new run before anything is written:

* a change to something that defines the trained state (STATE_KEYS, the base weights, the
  global batch) is one error naming the key and both values;
* any other change (train_steps, lr, logging, ...) is accepted and listed, and takes effect.

The output folder keeps each segment's config in `segments/config-from-step-<k>.yaml`;
`config.yaml` is the newest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcog.config import Config, to_dict
from fastcog.errors import ConfigError

RUN_RECORD = "run.json"
SEGMENTS = "segments"

# Keys whose change means the checkpoint's tensors or data position describe another run.
STATE_KEYS: dict[str, str] = {
    "model.training_type": "the checkpoint holds another set of trainable tensors",
    "model.dtype": "the optimizer state and the frozen weights were trained in the saved dtype",
    "lora.rank": "the saved adapters have another shape",
    "lora.alpha": "the saved adapters were trained with another scale",
    "lora.target_modules": "the saved adapters sit on other layers",
    "optim.name": "the saved optimizer state belongs to another optimizer",
    "optim.cpu_offload": "the optimizer state is saved in another layout",
    "train.seed": "the data order and noise draws after the resume point follow the seed",
}

# Sampled bytes per weight file: enough to tell two checkpoints apart (weights differ in every
# block), cheap on a 10 GB folder (about 1 MiB read per file).
_BLOCK, _BLOCKS = 64 * 1024, 16


def transformer_fingerprint(model_path: str | Path) -> str:
    """The base transformer's identity by content (a moved folder keeps it): a hash of its files' names,
    sizes and sampled bytes. (The latent cache keys its encoders by fastcog.data.cache.model_fingerprint.)"""
    folder = Path(model_path) / "transformer"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}:{size}\n".encode())
        with open(f, "rb") as fh:
            for i in range(_BLOCKS):
                fh.seek(max(0, size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()[:16]


def run_record(cfg: Config, variant_name: str, world_size: int) -> dict[str, Any]:
    return {"config": to_dict(cfg), "world_size": world_size, "variant": variant_name,
            "model_fingerprint": transformer_fingerprint(cfg.model.path)}


def write_run_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=1))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass(frozen=True)
class ResumeCheck:
    accepted: list[str]
    """One `key: old -> new` line per accepted change."""


def check_resume(checkpoint: Path, new: dict[str, Any]) -> ResumeCheck:
    """Compare the checkpoint's run record with the new run's (`run_record`); raise on a change
    that defines the trained state. A checkpoint without a record is accepted unchecked."""
    path = checkpoint / RUN_RECORD
    if not path.is_file():
        return ResumeCheck([f"{checkpoint.name} has no {RUN_RECORD}: the config change check was skipped"])
    old = json.loads(path.read_text())
    where = f"checkpoint.resume_from={checkpoint}"
    if old["variant"] != new["variant"]:
        raise ConfigError(f"model.path: the checkpoint trained a {old['variant']}, this model is a "
                          f"{new['variant']}; resume onto the same base model ({where})")
    if old["model_fingerprint"] != new["model_fingerprint"]:
        raise ConfigError(
            f"model.path: other base weights than the checkpoint's (was {old['config']['model']['path']!r}, "
            f"fingerprint {old['model_fingerprint']}; now {new['config']['model']['path']!r}, fingerprint "
            f"{new['model_fingerprint']}); resume onto the same base model, or start a new train.output_dir"
        )
    before, after = _flatten(old["config"]), _flatten(new["config"])
    for key, why in STATE_KEYS.items():
        if before.get(key) != after.get(key):
            raise ConfigError(f"{key} changed from {before.get(key)!r} to {after.get(key)!r} since {checkpoint.name}:"
                              f" {why}; set it back, or start a new train.output_dir")
    old_batch = before["train.batch_size"] * old["world_size"]
    new_batch = after["train.batch_size"] * new["world_size"]
    if old_batch != new_batch:
        raise ConfigError(
            f"train.batch_size x processes changed from {before['train.batch_size']} x {old['world_size']} to "
            f"{after['train.batch_size']} x {new['world_size']} since {checkpoint.name}: the saved data position "
            f"counts global batches of {old_batch}; keep the global batch, or start a new train.output_dir"
        )
    ignored = {"checkpoint.resume_from"}
    accepted = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in after
                if k not in ignored and before.get(k) != after.get(k)]
    return ResumeCheck(accepted)


def segment_config_path(output_dir: Path, start_step: int) -> Path:
    return output_dir / SEGMENTS / f"config-from-step-{start_step}.yaml"
