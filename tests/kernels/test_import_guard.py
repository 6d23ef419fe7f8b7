"""The repo's kernels/ must never register the fastcog:: ops a second time.

transformers probes for the PyPI package `kernels` with importlib; with the checkout on
sys.path (pytest, `python -m`) that finds our kernels/ folder. A second registration of the
custom ops would leave fastcog.kernels calling a freed op handle (seen once as a random
`ValueError: vector::reserve` in CI).
"""

import importlib
import sys

import pytest
import torch
from fastcog.kernels import lora_linear as public_lora_linear

lora_module = importlib.import_module("fastcog.kernels.lora_linear")


def test_top_level_kernels_import_registers_nothing():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    try:
        top = importlib.import_module("kernels")
        assert top.__all__ == []
        with pytest.raises(ImportError, match="fastcog.kernels"):
            importlib.import_module("kernels.lora_linear")
    finally:
        sys.path.pop(0)
    assert lora_module.lora_linear_fwd._opoverload is torch.ops.fastcog.lora_linear_fwd.default
    x = torch.randn(3, 8)
    w, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    torch.testing.assert_close(public_lora_linear(x, w, None, a, b, 0.5), x @ w.T + 0.5 * (x @ a.T) @ b.T)
