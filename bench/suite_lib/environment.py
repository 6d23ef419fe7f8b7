"""The setup stage's record of the machine: package versions, CUDA / cuDNN, the GPU, the commit.

    python bench/suite_lib/environment.py OUT.json [--require-cuda]

Runs as its own process after the carried wheels are installed, so it sees what the later stages
will import. On a machine where fastcog is not installed it installs this checkout editable, offline
(`pip install --no-deps --no-index -e .`): that is what makes ``fastcog.kernels`` resolve to kernels/.
Exit 1 (one line) with --require-cuda and no CUDA device: without one every GPU test
would be skipped and read as passed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "diffusers", "peft", "transformers", "accelerate", "torchao", "bitsandbytes")
REQUIRED_MODULES = ("fastcog.kernels", "diffusers", "peft")
"""Without these no benchmark stage can run."""


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit(repo: Path) -> dict[str, Any]:
    """The commit from FASTCOG_GIT_COMMIT (a copy with no .git, e.g. a GPU machine's), else from git."""
    if os.environ.get("FASTCOG_GIT_COMMIT"):
        return {"commit": os.environ["FASTCOG_GIT_COMMIT"], "dirty": os.environ.get("FASTCOG_GIT_DIRTY"),
                "source": "environment"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                               timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "source": "unknown: no git and no FASTCOG_GIT_COMMIT"}
    return {"commit": commit, "dirty": dirty if commit else None, "source": "git" if commit else "unknown"}


def gpu_record() -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return record


def ensure_fastcog(repo: Path) -> None:
    if importlib.util.find_spec("fastcog") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                        "-e", str(repo)], check=False)
        importlib.invalidate_caches()


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    ensure_fastcog(Path(__file__).resolve().parents[2])
    record: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                              "versions": package_versions(), "gpu": gpu_record(),
                              "git": git_commit(Path(__file__).resolve().parents[2])}
    missing = []
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - reported as the stage's one line below
            missing.append(f"{module} ({type(err).__name__}: {err})")
    record["missing"] = missing
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    if missing:
        print(f"setup: cannot import {'; '.join(missing)}: carry the wheels (bench/fetch_gpu_wheels.py)",
              file=sys.stderr)
        return 1
    if "--require-cuda" in argv and not record["gpu"]["cuda_available"]:
        print("setup: no CUDA device: this suite measures a GPU (--dry-run runs its plumbing on a CPU)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
