"""bench/fetch_gpu_wheels.py without network: the bitsandbytes slimming on a synthetic wheel, and the
versions it carries are constraints.txt's pins (the ones the CPU tests run with)."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "fetch_gpu_wheels.py"

spec = importlib.util.spec_from_file_location("fastcog_fetch_gpu_wheels", SCRIPT)
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)

DIST = "bitsandbytes-0.50.2.dist-info"
LIBS = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026"]


def fake_wheel(path: Path) -> Path:
    files = {"bitsandbytes/__init__.py": b"x = 1\n", f"{DIST}/METADATA": b"Name: bitsandbytes\n",
             **{f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in LIBS}}
    record = "".join(f"{name},sha256=fake,{len(data)}\n" for name, data in files.items()) + f"{DIST}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{DIST}/RECORD", record)
    return path


def contents(wheel: Path) -> tuple[set[str], set[str], dict[str, bytes]]:
    with zipfile.ZipFile(wheel) as z:
        assert z.testzip() is None
        record = {row[0] for row in csv.reader(io.StringIO(z.read(f"{DIST}/RECORD").decode())) if row}
        return set(z.namelist()), record, {n: z.read(n) for n in z.namelist()}


def lib(name: str) -> str:
    return f"bitsandbytes/libbitsandbytes_{name}.so"


@pytest.mark.parametrize("keep, kept", [(["13.0"], ["cpu", "cuda130"]), (["13"], ["cpu", "cuda130", "cuda132"]),
                                        (["13.0", "12.8"], ["cpu", "cuda128", "cuda130"])])
def test_slimming_keeps_cpu_and_chosen_cuda_drops_the_rest_from_archive_and_record(tmp_path, keep, kept):
    wheel = fake_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl")
    _, _, before = contents(wheel)
    dropped = fetch.slim_bitsandbytes(wheel, keep)

    names, record, after = contents(wheel)
    assert sorted(dropped) == sorted(lib(x) for x in LIBS if x not in kept)
    assert names == record  # RECORD names exactly the files the archive holds
    assert {n for n in names if "libbitsandbytes_" in n} == {lib(x) for x in kept}
    assert all(after[n] == before[n] for n in names - {f"{DIST}/RECORD"})  # kept files unchanged
    assert {"bitsandbytes/__init__.py", f"{DIST}/METADATA"} <= names


def test_slimming_refuses_to_drop_every_cuda_library(tmp_path):
    wheel = fake_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl")
    with pytest.raises(SystemExit, match="no CUDA library"):
        fetch.slim_bitsandbytes(wheel, ["14"])


def test_carried_versions_are_the_constraints_pins_and_installed_here():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (op_version,) = req.specifier
            pins[fetch.canonical(req.name)] = op_version.version
    specs = fetch.requirements(fetch.read_pins(), fetch.PACKAGES, required=True)
    assert {fetch.canonical(s.split("==")[0]): s.split("==")[1] for s in specs} == {
        fetch.canonical(p): pins[fetch.canonical(p)] for p in fetch.PACKAGES}
    # The GPU run carries the versions the CPU tests run with.
    for name in fetch.PACKAGES:
        assert importlib.metadata.version(name) == pins[fetch.canonical(name)], name
