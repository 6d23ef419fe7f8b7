"""model.dtype: the names a config uses and the torch dtype each stands for.

torch is imported when a dtype is first asked for, not here, so loading a config does not import it.
"""

from __future__ import annotations

import typing
from typing import Literal

if typing.TYPE_CHECKING:
    import torch

# model.dtype name -> attribute of torch.
_TORCH_ATTRS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

DTYPES: tuple[str, ...] = tuple(_TORCH_ATTRS)
DtypeName = Literal[DTYPES]  # type: ignore[valid-type]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a model.dtype name."""
    import torch

    return getattr(torch, _TORCH_ATTRS[name])

