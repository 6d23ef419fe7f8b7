#!/usr/bin/env python3
"""Download the wheels the offline GPU machine lacks, into .whl/ (git-ignored), for its Python 3.12
on manylinux x86-64:

    python3 bench/fetch_gpu_wheels.py [--bnb-cuda 13.0[,12.8 ...]] [--extra av ...] [--dest .whl]

Run it on a machine with network (pip download through the configured index). The GPU machine has
torch, triton, transformers, accelerate, huggingface_hub, safetensors and the common libraries, but
not the packages below; the GPU run installs whatever lies in .whl/ with pip --no-index
--no-deps, so this set is every missing package and every missing dependency:

    diffusers, importlib_metadata (diffusers needs it), lazy-importer (importlib_metadata needs it
    on Python < 3.15), peft (fastcog's fused-LoRA routing reads peft internals, so the GPU run uses
    the peft the CPU tests use, not the machine's own), torchao, bitsandbytes, prodigyopt,
    came-pytorch.

Versions: each is pinned in constraints.txt, which every install here uses, so the GPU run carries
exactly the versions the CPU tests run with; a package missing from constraints.txt is an error.

A device call carries at most 64 MiB, so the default set must stay under 16 MiB; the script fails
with one line if it does not. bitsandbytes ships native libraries for every CUDA, ROCm and XPU
version (41 MiB); it loads the one matching torch.version.cuda (else the nearest of the same major),
so the wheel is slimmed to its CPU library and the CUDA libraries of --bnb-cuda, and its RECORD
rewritten to match. The default, 13.0, is the machine's cu130 torch; each CUDA 13 library is
3.4 MiB compressed, so keeping every 13.x (--bnb-cuda 13) puts the default set over the limit.
--extra adds packages outside the limit (e.g. av, 33 MiB, only for decoding video clips), pinned by
constraints.txt when it pins them; their size is reported on its own line.

Measured (bitsandbytes 0.50.2 slimmed to cpu + cuda130): the default set is 8 wheels,
14,220,430 bytes (13.6 MiB): diffusers 6.1, bitsandbytes 3.4, torchao 3.2, peft 0.8 MiB, the rest 0.06 MiB.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
LIMIT_MIB = 16
# The GPU machine's interpreter and platform; manylinux_2_28 down to manylinux1 covers every
# manylinux tag its glibc accepts.
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
PACKAGES = ["diffusers", "importlib_metadata", "lazy-importer", "peft", "torchao", "bitsandbytes",
            "prodigyopt", "came-pytorch"]
BNB_LIB = re.compile(r"^bitsandbytes/libbitsandbytes_([a-z]+)(\d*)\.(?:so|dylib|dll)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} for every `name==version` line of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def requirements(pins: dict[str, str], names: list[str], *, required: bool) -> list[str]:
    """`name==pin` for each name; an unpinned name is an error when required, else passed bare."""
    out = []
    for name in names:
        if any(c in name for c in "=<>!~ ;["):  # already a requirement spec
            out.append(name)
        elif canonical(name) in pins:
            out.append(f"{name}=={pins[canonical(name)]}")
        elif required:
            raise SystemExit(f"fetch_gpu_wheels: {name} is not pinned in {CONSTRAINTS.name}")
        else:
            out.append(name)
    return out


def cuda_kept(compact: str, keep: list[str]) -> bool:
    """Whether a CUDA library version ('130' = 13.0, as bitsandbytes names them) is kept: each of
    keep is a major ('13', every 13.x) or a major.minor ('12.8')."""
    major, minor = compact[:2], compact[2:]
    return any(k == major or k == f"{major}.{minor}" for k in keep)


def slim_bitsandbytes(wheel: Path, keep_cuda: list[str]) -> list[str]:
    """Rewrite a bitsandbytes wheel in place with only its CPU library and the CUDA libraries of
    keep_cuda (ROCm, XPU and other CUDA versions dropped), its RECORD without the dropped files.
    Returns the dropped paths; fails if no CUDA library is kept."""
    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        dropped, kept_cuda = [], []
        for info in infos:
            m = BNB_LIB.match(info.filename)
            if not m or m.group(1) == "cpu":
                continue
            if m.group(1) == "cuda" and cuda_kept(m.group(2), keep_cuda):
                kept_cuda.append(info.filename)
            else:
                dropped.append(info.filename)
        if not kept_cuda:
            raise SystemExit(f"fetch_gpu_wheels: {wheel.name} has no CUDA library for --bnb-cuda "
                             f"{','.join(keep_cuda)}")
        drop = set(dropped)
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in infos:
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    # RECORD lists every file of the wheel; installers read it, so it must not name
                    # files that are gone. The kept files are unchanged, so their hashes still hold.
                    rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] not in drop]
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerows(rows)
                    data = buf.getvalue().encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    return dropped


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def download(specs: list[str], dest: Path) -> list[Path]:
    """pip download, no dependencies (each is listed), binary wheels for the GPU machine only."""
    if not specs:
        return []
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp" + PYTHON.replace(".", ""),
               *(a for p in PLATFORMS for a in ("--platform", p)), "-d", tmp, *specs]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"fetch_gpu_wheels: pip download failed for {' '.join(specs)}")
        files = []
        for f in sorted(Path(tmp).iterdir()):
            files.append(dest / f.name)
            shutil.move(f, files[-1])
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bnb-cuda", default="13.0",
                    help="CUDA versions whose bitsandbytes library is kept, comma-separated: a major "
                         "(13: every 13.x) or major.minor (12.8); default %(default)s, the GPU machine's torch")
    ap.add_argument("--extra", nargs="+", default=[], metavar="PKG",
                    help="more packages (e.g. av), outside the size limit; pinned by constraints.txt "
                         "when it pins them")
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl",
                    help="directory for the wheels; its old *.whl files are removed (default .whl/)")
    args = ap.parse_args(argv)
    keep = [k.strip() for k in args.bnb_cuda.split(",") if k.strip()]
    if not keep or not all(re.fullmatch(r"\d{2}(\.\d+)?", k) for k in keep):
        ap.error(f"--bnb-cuda {args.bnb_cuda!r}: expected e.g. 13.0, 13 or 13.0,12.8")

    pins = read_pins()
    specs = requirements(pins, PACKAGES, required=True)
    extras = requirements(pins, args.extra, required=False)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # a stale full-size wheel would be carried too
        old.unlink()

    wheels = download(specs, args.dest)
    for w in wheels:
        if w.name.startswith("bitsandbytes-"):
            before = w.stat().st_size
            dropped = slim_bitsandbytes(w, keep)
            print(f"{w.name}: {mib(before)} -> {mib(w.stat().st_size)}, dropped {len(dropped)} libraries")
    extra_wheels = download(extras, args.dest)

    for w in wheels + extra_wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}{'  (extra)' if w in extra_wheels else ''}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"default set: {len(wheels)} wheels, {mib(total)} (limit {LIMIT_MIB} MiB) in {args.dest}")
    if extra_wheels:
        extra_total = sum(w.stat().st_size for w in extra_wheels)
        print(f"with extras: {len(wheels) + len(extra_wheels)} wheels, {mib(total + extra_total)} "
              f"(a device call carries at most 64 MiB in all)")
    if total > LIMIT_MIB * 2**20:
        print(f"fetch_gpu_wheels: the default set is {mib(total)}, over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
