"""The repo's kernels/ must never register the fastcog:: ops a second time.

With the checkout on sys.path (pytest, `python -m`), the folder kernels/ shadows the PyPI
package `kernels`, which transformers imports when it is installed. A second registration of
the custom ops would leave fastcog.kernels calling a freed op handle (a random
`ValueError: vector::reserve`); a shadowed PyPI package breaks transformers' import.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from fastcog.kernels import lora_linear as public_lora_linear

CHECKOUT = Path(__file__).resolve().parents[2]
lora_module = importlib.import_module("fastcog.kernels.lora_linear_op")


def import_top_level_kernels():
    """`import kernels` with the checkout first on sys.path, as from a fresh interpreter."""
    saved = {n: m for n, m in sys.modules.items() if n == "kernels" or n.startswith("kernels.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(CHECKOUT))
    try:
        return importlib.import_module("kernels")
    finally:
        sys.path.pop(0)
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def pypi_kernels_installed() -> bool:
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT])
    return spec is not None


def test_top_level_kernels_import_registers_nothing():
    import_top_level_kernels()
    assert lora_module.lora_linear_fwd._opoverload is torch.ops.fastcog.lora_linear_fwd.default
    x = torch.randn(3, 8)
    w, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    torch.testing.assert_close(public_lora_linear(x, w, None, a, b, 0.5), x @ w.T + 0.5 * (x @ a.T) @ b.T)


def test_top_level_kernels_is_the_pypi_package_when_installed():
    top = import_top_level_kernels()
    if pypi_kernels_installed():
        assert Path(top.__file__).resolve().parent != CHECKOUT / "kernels"
    else:
        assert top.__all__ == []


def test_kernel_modules_refuse_a_top_level_import():
    spec = importlib.util.spec_from_file_location("kernels_checkout.lora_linear", CHECKOUT / "kernels" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="fastcog.kernels"):
        spec.loader.exec_module(module)
