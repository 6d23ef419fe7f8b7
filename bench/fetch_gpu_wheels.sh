#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine's image lacks (it has torch
# 2.11, triton 3.6, transformers, peft, accelerate; not diffusers (nor its importlib_metadata), torchao, bitsandbytes, PyAV,
# prodigyopt, came-pytorch) for its Python 3.12, into .whl/ (git-ignored). Carry .whl with the
# device call; bench/gpu_check.sh installs them with --no-index --no-deps into /tmp/site.
# A device call carries at most 64 MiB: the default set is ~10 MB. bitsandbytes (43 MB) and
# PyAV (35 MB, only for decoding clips) are added with EXTRA="bitsandbytes==0.50.2 av".
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
# Versions: the ones this repo's CPU tests run with (constraints.txt pins only torch / triton).
rm -rf .whl
for pkg in diffusers==0.42.1 importlib_metadata torchao==0.18.0 prodigyopt==1.1.2 came-pytorch==0.1.3 ${EXTRA:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
du -sh .whl && ls .whl
