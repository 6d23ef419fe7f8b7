import re
from pathlib import Path

from setuptools import setup

# The version's one home is fastcog/__init__.py (`fastcog --version` prints it); read as text, since
# importing the package at build time would need its dependencies installed first.
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "fastcog" / "__init__.py").read_text(),
                    re.M).group(1)

# kernels/ is shipped as fastcog.kernels: a top-level package called `kernels` would
# collide with the PyPI package of that name, which diffusers and transformers probe for.
setup(
    name="fastcog",
    version=VERSION,
    description="Fast, trustworthy LoRA / full fine-tuning for CogVideoX video diffusion models",
    python_requires=">=3.11",
    packages=["fastcog", "fastcog.data", "fastcog.kernels"],
    package_dir={"fastcog": "fastcog", "fastcog.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "diffusers>=0.32",
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate>=0.34",
        "safetensors",
        "sentencepiece",
        "av>=12",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        # Low-bit and alternative optimizers (optim.name), FP8 helpers; all install on CPU too.
        "torchao>=0.10",
        "bitsandbytes>=0.45",
        "prodigyopt>=1.1",
        "came-pytorch>=0.1.3",
        # bench/throughput.py's loss-curve / step-time plot.
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff"],
        "wandb": ["wandb"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["fastcog=fastcog.cli:main"]},
)
