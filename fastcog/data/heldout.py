"""The held-out set of the validation loss: split off the training data, or read from its own file.

Two ways, one per run (fastcog.config_validate checks that only one is configured):

- `data.validation_fraction`: that fraction of the distinct clips (rounded down) is held out. The
  clips are ranked by a hash of train.seed and their path under data_root, so the choice does
  not depend on the order of the list files, and the same seed holds out the same clips. Whole
  clips go: a clip listed twice (two captions) is held out with both, or it would be trained on.
- `data.validation_metadata_file` (CSV / JSONL) or `data.validation_caption_column` +
  `data.validation_video_column` (list files): the same formats as the training data, relative
  to data_root. A clip that is also in the training data is an error: its loss would not be a
  held-out one.

Either way the held-out samples go into the latent cache with the training samples and never
reach the training sampler (fastcog.inputs.prepare_datasets).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastcog.config_schema import Config
from fastcog.data.listfile import Sample, read_dataset
from fastcog.errors import ConfigError


@dataclass(frozen=True)
class DataSplit:
    """The samples a run trains on and the ones it only evaluates."""

    train: list[Sample]
    heldout: list[Sample] = field(default_factory=list)
    source: str = ""
    """How the held-out set was chosen (a config key and value), for the start-of-run banner."""

    @property
    def all(self) -> list[Sample]:
        """Everything to encode into the cache: the training samples, then the held-out ones."""
        return self.train + self.heldout


def split_heldout(cfg: Config, samples: list[Sample]) -> DataSplit:
    """`samples` (the training data as configured) -> what trains and what is held out.

    Raises a ConfigError naming the key for a held-out file that does not exist, a fraction that
    holds out no clip, and a held-out file that lists training clips.
    """
    d = cfg.data
    if d.validation_fraction > 0:
        return _split_by_fraction(samples, d.validation_fraction, cfg.train.seed, Path(d.data_root))
    key, value = _heldout_file(cfg)
    if key is None:
        return DataSplit(samples)
    root = Path(d.data_root)
    for option, name in _heldout_keys(cfg):
        if name is not None and not (root / name).is_file():
            where = "is not a file" if (root / name).exists() else "does not exist"
            raise ConfigError(f"data.{option}={name!r}: {root / name} {where}; give a file relative to "
                              f"data.data_root {str(root)!r} (or an absolute path)")
    heldout = read_dataset(root, metadata_file=d.validation_metadata_file,
                           caption_column=d.validation_caption_column or "",
                           video_column=d.validation_video_column or "", image_column=d.validation_image_column)
    trained = {s.video.resolve() for s in samples}
    shared = [str(s.video) for s in heldout if s.video.resolve() in trained]
    if shared:
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise ConfigError(f"data.{key}={value!r} lists {len(shared)} clip(s) that are also training data "
                          f"({', '.join(shared[:3])}{more}): a held-out clip must not be trained on; remove them "
                          "from one of the two")
    return DataSplit(samples, heldout, f"data.{key}={value}")


def _heldout_keys(cfg: Config) -> list[tuple[str, str | None]]:
    d = cfg.data
    return [("validation_metadata_file", d.validation_metadata_file),
            ("validation_caption_column", d.validation_caption_column),
            ("validation_video_column", d.validation_video_column),
            ("validation_image_column", d.validation_image_column)]


def _heldout_file(cfg: Config) -> tuple[str | None, str | None]:
    """(the key naming the held-out file, its value), or (None, None) when there is none."""
    for key, value in _heldout_keys(cfg)[:2]:
        if value is not None:
            return key, value
    return None, None


def clip_rank_key(seed: int, video: Path, data_root: Path) -> str:
    """Where a clip falls in the held-out order: a hash of the seed and its path under data_root
    (its name when it lies outside), so moving the dataset folder keeps the choice."""
    try:
        name = video.resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        name = video.name
    return hashlib.sha256(f"heldout:{seed}:{name}".encode()).hexdigest()


def _split_by_fraction(samples: list[Sample], fraction: float, seed: int, data_root: Path) -> DataSplit:
    clips = sorted({s.video for s in samples}, key=lambda v: clip_rank_key(seed, v, data_root))
    # Rounded down; the epsilon keeps 0.3 x 10 (2.9999999999999996 in floating point) at 3.
    count = math.floor(fraction * len(clips) + 1e-9)
    if count == 0:
        raise ConfigError(f"data.validation_fraction={fraction} of {len(clips)} clips holds out none (rounded "
                          f"down): use at least {1 / len(clips):.3g}, or name a held-out file "
                          "(data.validation_metadata_file)")
    if count >= len(clips):
        raise ConfigError(f"data.validation_fraction={fraction} of {len(clips)} clips holds out all of them: "
                          "lower it so that a clip is left to train on")
    held = set(clips[:count])
    return DataSplit([s for s in samples if s.video not in held], [s for s in samples if s.video in held],
                     f"data.validation_fraction={fraction:g} of {len(clips)} clips, by train.seed")
