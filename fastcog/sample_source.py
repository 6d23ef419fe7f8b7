"""Where `fastcog sample` takes its model from: a run folder, one of its checkpoints, or an
explicit base model and LoRA; and loading those weights.

What `fastcog train` leaves in train.output_dir: `config.yaml` (the resolved config: base model,
dtype, LoRA shape, training resolution, I2V image scale), the exported result
(`lora/pytorch_lora_weights.safetensors`, or `transformer/` for full fine-tuning) once the run
finished, and `checkpoint-<step>/` folders (DCP, trainable tensors by parameter name) all along;
a stopped run has only those. Every problem a user can fix is found here, before any weight is
loaded, and raised as one FastcogError line that says what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcog.checkpoint import MARKER, list_checkpoints, read_trainable
from fastcog.config import Config, load_config
from fastcog.config_schema import ModelConfig
from fastcog.errors import ConfigError, ModelError
from fastcog.lora import ADAPTER_NAME, LORA_WEIGHTS_NAME, lora_adapter_metadata
from fastcog.models import read_variant
from fastcog.variants import VariantSpec

RUN_CONFIG = "config.yaml"
SAMPLE_ADAPTER = "fastcog"
"""The adapter name a sampled LoRA is loaded under (its strength is set by that name)."""


@dataclass(frozen=True)
class Source:
    """The weights to render with, all paths checked."""

    model: Path
    """The base diffusers folder (VAE, T5, tokenizer, scheduler, and the transformer unless SFT)."""
    variant: VariantSpec
    dtype: str
    cfg: Config | None
    """The run's config; None for an explicit --model."""
    run_dir: Path | None
    checkpoint: Path | None
    """A checkpoint-<step> folder whose trainable tensors replace the exported ones."""
    lora: Path | None
    """A diffusers-format LoRA file."""
    transformer: Path | None
    """A full fine-tune's exported transformer folder (used instead of the base's)."""

    @property
    def has_lora(self) -> bool:
        sft = self.cfg is not None and self.cfg.model.training_type == "sft"
        return self.lora is not None or (self.checkpoint is not None and not sft)


def _run_folder(arg: str) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder or None) for the positional RUN argument."""
    path = Path(arg)
    if not path.is_dir():
        raise ConfigError(f"run folder {arg!r} does not exist: give the train.output_dir of a run, or --model "
                          "(and --lora) instead")
    if path.name.startswith("checkpoint-"):
        if not (path / MARKER).is_file():
            raise ConfigError(f"{arg} is not a complete checkpoint (no {MARKER} marker: it was never fully written): "
                              "sample another checkpoint-<step> of the run")
        return path.parent, path
    return path, None


def _lora_file(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise ModelError(f"--lora {arg!r}: no such file: give a {LORA_WEIGHTS_NAME} (as `fastcog train` exports it "
                         "under <output_dir>/lora/) or the folder holding it")
    return path


def _exported_weights(run_dir: Path, cfg: Config) -> tuple[Path | None, Path | None]:
    """(LoRA file, SFT transformer folder) a finished run exported; an error naming a checkpoint when
    the run stopped before exporting."""
    sft = cfg.model.training_type == "sft"
    path = run_dir / "transformer" if sft else run_dir / "lora" / LORA_WEIGHTS_NAME
    if (path / "config.json").is_file() if sft else path.is_file():
        return (None, path) if sft else (path, None)
    what = "fine-tuned transformer" if sft else "LoRA"
    checkpoints = list_checkpoints(run_dir)
    instead = (f"sample its newest checkpoint instead (fastcog sample {checkpoints[-1][1]})" if checkpoints
               else "the run exports it when it finishes")
    flag = "" if sft else ", or pass --lora FILE"
    raise ModelError(f"{run_dir} has no exported {what} ({path.relative_to(run_dir)}): {instead}{flag}")


def resolve_source(run: str | None, model: str | None, lora: str | None, dtype: str | None) -> Source:
    """Check the arguments naming the weights and find every file they need (nothing is loaded)."""
    cfg = run_dir = checkpoint = None
    if run is not None:
        run_dir, checkpoint = _run_folder(run)
        if not (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(f"{run_dir} holds no {RUN_CONFIG}, so it is not a `fastcog train` output folder: give "
                              "the run's train.output_dir, or --model (and --lora) instead")
        cfg = load_config(run_dir / RUN_CONFIG)
    elif model is None:
        raise ConfigError("nothing to sample: give a run folder (fastcog sample outputs/my_run) or --model DIR "
                          "(a diffusers CogVideoX folder), with --lora FILE for a LoRA")
    model_path = Path(model if model is not None else cfg.model.path)
    if not model_path.is_dir():
        where = "--model" if model is not None else f"model.path in {run_dir / RUN_CONFIG}"
        fix = ("a local diffusers-format CogVideoX folder" if model is not None
               else "pass --model with the base model's folder")
        raise ModelError(f"{where}: {str(model_path)!r} does not exist here: {fix}")
    variant = read_variant(model_path)
    lora_path = transformer = None
    if lora is not None:
        lora_path = _lora_file(lora)
    elif run_dir is not None and checkpoint is None:
        lora_path, transformer = _exported_weights(run_dir, cfg)
    return Source(model=model_path, variant=variant, dtype=dtype or (cfg.model.dtype if cfg else ModelConfig().dtype),
                  cfg=cfg, run_dir=run_dir, checkpoint=checkpoint, lora=lora_path, transformer=transformer)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_transformer(source: Source, torch_dtype: torch.dtype, base: Any) -> Any:
    """The transformer to render with: `base` (loaded from the model folder) unless the run is a
    full fine-tune, whose exported folder or checkpoint replaces its weights."""
    if source.transformer is not None:
        from diffusers import CogVideoXTransformer3DModel

        try:
            module = CogVideoXTransformer3DModel.from_pretrained(source.transformer, torch_dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {source.transformer}: {str(err).splitlines()[0]}") from None
        return module.requires_grad_(False).eval()
    if source.checkpoint is not None and not source.has_lora:
        weights = read_trainable(source.checkpoint)
        params = {name for name, _ in base.named_parameters()}
        missing, unexpected = params - weights.keys(), weights.keys() - params
        if missing or unexpected:
            raise ModelError(f"{source.checkpoint} does not match {source.model}'s transformer ({len(missing)} "
                             f"missing, {len(unexpected)} unexpected tensors): pass --model with the run's base model")
        base.load_state_dict(weights, strict=False)
    return base


def _lora_tensors(source: Source, pipe_cls: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(diffusers-format tensors, diffusers adapter metadata), from the LoRA file or the checkpoint.

    A checkpoint holds peft's parameter names (`...to_q.lora_A.default.weight`) and no alpha;
    they are renamed as the export names them and given the run's alpha, so both load alike.
    """
    if source.lora is not None:
        return pipe_cls.lora_state_dict(source.lora, return_lora_metadata=True)
    tensors = {"transformer." + name.replace(f".{ADAPTER_NAME}.", "."): t
               for name, t in read_trainable(source.checkpoint).items()}
    metadata = {f"transformer.{k}": v for k, v in lora_adapter_metadata(source.cfg.lora).items()}
    return tensors, metadata


def load_lora(source: Source, transformer: Any, pipe_cls: Any, scale: float) -> None:
    """Load the LoRA into `transformer` at strength `scale` (1: as trained, alpha / rank included;
    0: the base model), checking that every one of its tensors found a layer."""
    from safetensors import SafetensorError

    where = source.lora or source.checkpoint
    try:
        tensors, metadata = _lora_tensors(source, pipe_cls)
        transformer.load_lora_adapter(tensors, prefix="transformer", adapter_name=SAMPLE_ADAPTER, metadata=metadata)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelError(f"cannot load the LoRA {where} into {source.model}: {str(err).splitlines()[0]}") from None
    loaded = sum(f".{SAMPLE_ADAPTER}." in name for name, _ in transformer.named_parameters())
    if loaded != len(tensors):
        raise ModelError(f"only {loaded} of the {len(tensors)} tensors of the LoRA {where} match layers of "
                         f"{source.model}: it was trained on another model; pass that one with --model")
    transformer.set_adapters([SAMPLE_ADAPTER], weights=[scale])
