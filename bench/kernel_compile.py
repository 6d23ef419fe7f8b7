"""Compile every fastcog Triton launch of a real-shape step for a GPU target, on any machine.

The CPU test tier runs the kernels under the Triton interpreter, which never compiles them: a
kernel can pass every parity test and still fail to compile for a GPU, spill registers, or
ask for more shared memory than a block may have. This script closes that gap without a GPU.
It installs a Triton driver that knows a target (sm_90 by default) but has no device, runs a
real forward + backward of ``lora_linear`` (one case per CogVideoX linear shape) and of
``add_noise`` / ``velocity_mse_loss`` on CPU tensors of the real shapes, and catches every
kernel launch in Triton's ``jit_cache_hook``: the launch's real specialization (dtypes,
16-divisible sizes and strides, constexprs) is compiled for the target and then skipped, so
nothing runs and the outputs are garbage. For every launch and every autotune config it
reports:

* registers per thread and spill bytes (ptxas -v on the generated PTX),
* shared memory per block against the target's limit,
* the MMA instruction used (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80), and
* whether the K loop is software-pipelined (``cp.async`` / bulk copies in the PTX).

This is a static check: it says a config can run well, never how fast it runs. The block
size sweep itself (bench/kernel_bench.py --sweep) needs the GPU; this prunes its candidates and
keeps CI honest about native compilation.

    python bench/kernel_compile.py                       # sm_90, every case, every config
    python bench/kernel_compile.py --arch 80 --check     # exit 1 on a spill / smem / MMA / pipelining failure
    python bench/kernel_compile.py --cases ci --configs 128x128x64:8:3,64x64x64:4:4

Must run without TRITON_INTERPRET=1 (the kernels must be defined as compiled kernels).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Largest dynamic shared memory one block may use (CUDA programming guide, "Compute
# capabilities" table): 227 KB on sm_90, 163 KB on sm_80.
SMEM_LIMIT = {90: 232_448, 80: 166_912}
MMA_INSTRUCTION = {90: "wgmma.mma_async", 80: "mma.sync"}


@dataclass
class Launch:
    case: str
    kernel: str
    shape: str  # M x N x K (+K2) for fused_mm, elements for the loss kernels
    config: str  # BLOCK_MxBLOCK_NxBLOCK_K:warps:stages
    compiled: bool
    regs: int
    spill_bytes: int
    smem_bytes: int
    mma: int  # MMA instructions in the PTX
    pipelined: bool  # async copies in the PTX
    compile_s: float
    problems: str  # "" when the launch passes every check


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT), help="compute capability x10")
    p.add_argument("--cases", default="full", choices=["full", "ci"], help="ci: 3072->3072 and the loss only")
    p.add_argument(
        "--configs",
        default="",
        help="fused_mm configs to compile instead of the kernel's autotune list, comma separated "
        "BLOCK_MxBLOCK_NxBLOCK_K:num_warps:num_stages (GROUP_M 8)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--check", action="store_true", help="exit 1 when any launch fails a check")
    return p.parse_args(argv)


def parse_configs(text: str) -> list:
    import triton

    configs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+):(\d+):(\d+)", item)
        if not m:
            raise SystemExit(f"--configs: {item!r} is not BLOCK_MxBLOCK_NxBLOCK_K:num_warps:num_stages")
        bm, bn, bk, warps, stages = map(int, m.groups())
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


def config_label(meta: dict, warps: int, stages: int) -> str:
    if "BLOCK_M" in meta:
        return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}:{warps}:{stages}"
    return f"BLOCK={meta.get('BLOCK', '?')}:{warps}:{stages}"


class _TargetOnlyDriver:
    """Enough of a Triton driver to specialize and compile kernels: a target, no device."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v, with the ptxas Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [get_ptxas(arch).path, f"-arch={sm}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return int(regs.group(1)) if regs else -1, (int(spills.group(1)) + int(spills.group(2))) if spills else -1


class Recorder:
    """Compiles each distinct launch once, for ``arch``, instead of running it."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.case = ""
        self.launches: list[Launch] = []
        self._seen: set = set()
        self._shape = ""

    def pre_run(self, *args, **kwargs) -> None:  # Triton pre-run hook: the launch's arguments
        names = ("M", "N", "K1", "K2")
        if "M" in kwargs or len(args) >= 10:
            m, n, k1, k2 = (kwargs[x] if x in kwargs else args[6 + i] for i, x in enumerate(names))
            self._shape = f"{m}x{n}x{k1}" + (f"+{k2}" if k2 else "")
        else:  # the loss kernels: report the element count argument
            ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            self._shape = f"n={ints[0]}" if ints else ""

    def cache_hook(self, *, key, fn, compile, **_) -> bool:  # Triton jit_cache_hook
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        jit = fn.jit_function
        names = jit.arg_names
        consts = {names[path[0]]: v for path, v in compile["constants"].items() if len(path) == 1}
        label = config_label(consts, compile["num_warps"], compile["num_stages"])
        ident = (self.case, jit.fn.__name__, self._shape, str(key))
        if ident in self._seen:
            return True
        self._seen.add(ident)
        target = GPUTarget("cuda", self.arch, 32)
        src = ASTSource(jit, compile["signature"], compile["constants"], compile["configs"][0])
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        t0 = time.perf_counter()
        try:
            kernel = triton.compile(src, target=target, options=options)
            ptx = kernel.asm["ptx"]
            regs, spills = _ptxas_report(ptx, self.arch)
            smem = int(kernel.metadata.shared)
            compiled, err = True, ""
        except Exception as e:  # noqa: BLE001 -- a failed compile is a result to report, not a crash
            ptx, regs, spills, smem, compiled = "", -1, -1, -1, False
            err = f"compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        is_gemm = "BLOCK_K" in consts
        mma = ptx.count(MMA_INSTRUCTION[self.arch])
        pipelined = "cp.async" in ptx
        problems = [err] if err else []
        if compiled:
            if spills != 0:
                problems.append(f"{spills} bytes spilled")
            if smem > SMEM_LIMIT[self.arch]:
                problems.append(f"shared memory {smem} > {SMEM_LIMIT[self.arch]}")
            if is_gemm and mma == 0:
                problems.append(f"no {MMA_INSTRUCTION[self.arch]}")
            if is_gemm and compile["num_stages"] > 1 and not pipelined:
                problems.append("K loop not pipelined")
        self.launches.append(
            Launch(self.case, jit.fn.__name__, self._shape, label, compiled, regs, spills, smem, mma, pipelined,
                   time.perf_counter() - t0, "; ".join(problems))
        )  # fmt: skip
        return True  # skip the real compile and the launch


def _install(recorder: Recorder, modules: list) -> Callable[[], None]:
    """Point Triton at the target-only driver and the recorder; returns the undo."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    # Restored by hand: reset_active() would build the default driver, which fails with no GPU.
    previous_driver = getattr(driver, "_active", None)
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", recorder.arch, 32)))
    old_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = recorder.cache_hook
    patched = []
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                obj.add_pre_run_hook(recorder.pre_run)
                patched.append(obj)
        # The launchers refuse CPU tensors outside the interpreter; here nothing runs.
        patched.append((mod, "check_device", mod.check_device))
        mod.check_device = lambda *tensors: None

    def undo() -> None:
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(previous_driver)
        for item in patched:
            if isinstance(item, tuple):
                setattr(item[0], item[1], item[2])
            else:
                item.pre_run_hooks.remove(recorder.pre_run)

    return undo


def run(args: argparse.Namespace) -> list[Launch]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench/kernel_compile.py compiles kernels: unset TRITON_INTERPRET")
    import torch

    lora = importlib.import_module("fastcog.kernels.lora_linear")
    loss = importlib.import_module("fastcog.kernels.diffusion_loss")
    from fastcog.kernels import add_noise, lora_linear, velocity_mse_loss
    from fastcog.kernels.reference import cogvideox_alphas_cumprod

    configs = parse_configs(args.configs) if args.configs else list(lora._CONFIGS)
    recorder = Recorder(args.arch)
    undo = _install(recorder, [lora, loss])
    tuned, num_sms = lora._fused_mm_tuned, lora._num_sms
    saved_configs = tuned.configs
    lora._num_sms = lambda device: 132  # H100 SXM / H200: the split-K heuristic sees the real SM count
    try:
        m, r = 17_776, 128
        shapes = [("q/k/v/out 3072->3072", 3072, 3072)]
        if args.cases == "full":
            shapes += [("ff up 3072->12288", 3072, 12288), ("ff down 12288->3072", 12288, 3072)]
        dt = torch.bfloat16
        for label, k, n in shapes:
            x = torch.zeros(m, k, dtype=dt, requires_grad=True)
            w, b = torch.zeros(n, k, dtype=dt), torch.zeros(n, dtype=dt)
            a = torch.zeros(r, k, dtype=dt, requires_grad=True)
            bb = torch.zeros(n, r, dtype=dt, requires_grad=True)
            for cfg in configs:  # one config at a time: a single-config Autotuner never benchmarks
                tuned.configs = [cfg]
                recorder.case = f"lora {label} r{r} bf16"
                y = lora_linear(x, w, b, a, bb, 1.0)
                y.backward(torch.zeros_like(y))
        recorder.case = "loss 49x480x720 (1x13x16x60x90) bf16"
        shape = (1, 13, 16, 60, 90)
        z0, eps = torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)
        t = torch.tensor([500])
        abar = cogvideox_alphas_cumprod()
        xt = add_noise(z0, eps, t, abar)
        v = torch.zeros(shape, dtype=dt, requires_grad=True)
        velocity_mse_loss(v, xt, z0, t, abar).backward()
    finally:
        tuned.configs = saved_configs
        lora._num_sms = num_sms
        undo()
    return recorder.launches


def write(launches: list[Launch], args: argparse.Namespace) -> Path:
    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_compile_sm{args.arch}_triton{triton.__version__}{'_' + args.tag if args.tag else ''}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(launches[0])))
        writer.writeheader()
        writer.writerows(asdict(x) for x in launches)
    bad = [x for x in launches if x.problems]
    lines = [
        f"# Native compile check, sm_{args.arch} (no GPU needed)",
        "",
        f"{_dt.date.today().isoformat()}; triton {triton.__version__}, torch {torch.__version__}; "
        f"`python bench/kernel_compile.py --arch {args.arch} --cases {args.cases}"
        + (f" --configs {args.configs}" if args.configs else "")
        + "`",
        "",
        "Static facts from compiling each launch of a real-shape forward + backward for the target: "
        "registers and spills (ptxas -v), shared memory per block (limit "
        f"{SMEM_LIMIT[args.arch]} B), MMA instructions, async (pipelined) loads. Not a timing.",
        "",
        f"**{len(launches)} launches, {len(bad)} with problems.**",
        "",
        "| case | kernel | M x N x K | config | regs | spill B | smem B | MMA | pipelined | problems |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for x in launches:
        lines.append(
            f"| {x.case} | {x.kernel} | {x.shape} | {x.config} | {x.regs} | {x.spill_bytes} | {x.smem_bytes} "
            f"| {x.mma} | {'yes' if x.pipelined else 'no'} | {x.problems or '-'} |"
        )
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    launches = run(args)
    stem = write(launches, args)
    bad = [x for x in launches if x.problems]
    for x in launches:
        status = x.problems or "ok"
        print(f"{x.case:<40} {x.kernel:<22} {x.shape:<22} {x.config:<16} regs {x.regs:>4} smem {x.smem_bytes:>7} "
              f"{status}")  # fmt: skip
    print(f"{len(launches)} launches compiled for sm_{args.arch}, {len(bad)} with problems; wrote {stem}.md / .csv")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
