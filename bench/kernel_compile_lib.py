"""The machinery of bench/kernel_compile.py: compile each Triton launch for a GPU target with no GPU.

A Triton driver that knows a target but has no device; a ``jit_cache_hook`` (``Recorder``) that compiles
each launch's real specialization for the target, reads its facts from the PTX and ptxas, and skips the
launch; and the autotuner stand-ins that make every config an autotuner would time go through it.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Largest dynamic shared memory one block may use (CUDA programming guide, "Compute
# capabilities" table): 227 KB on sm_90, 163 KB on sm_80.
SMEM_LIMIT = {90: 232_448, 80: 166_912}
MMA_INSTRUCTION = {90: "wgmma.mma_async", 80: "mma.sync"}
# SMs of the GPUs these targets stand for: H100 SXM / H200 (132), A100 (108).
NUM_SMS = {90: 132, 80: 108}
# PTX operand type of each FP8 pointer type in a Triton signature.
PTX_FP8 = {"*fp8e4nv": "e4m3", "*fp8e5": "e5m2"}
_MMA_TYPES = re.compile(r"(?:wgmma\.mma_async\.sync|mma\.sync)\.aligned\.\S*?f32\.(\w+)\.(\w+)")
# Compile results by (arch, kernel, Triton cache key): a launch seen again (another case, another run in
# this process) is reported from here instead of compiled again.
_COMPILED: dict[tuple, Future] = {}
# Compiles run in these threads (Triton's passes and ptxas leave the interpreter lock) while the step goes on.
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)


@dataclass
class Launch:
    case: str
    kernel: str
    shape: str  # M x N x K (+ the LoRA K) for the GEMMs, M x r x K for the quantise pass, elements for the loss
    config: str  # BLOCK_MxBLOCK_NxBLOCK_K:warps:stages
    compiled: bool
    regs: int
    spill_bytes: int
    smem_bytes: int
    mma: int  # MMA instructions in the PTX
    mma_types: str  # their operand types, "a x b: count", e.g. "e4m3 x e4m3: 4; bf16 x bf16: 8"
    pipelined: bool  # async copies in the PTX
    even_k: str  # the K loops specialised as whole tiles (EVEN_* constexprs that are true)
    setp: int  # compare instructions in the PTX (masks, loop bounds)
    programs: int
    sm_fill: float  # programs / (SMs x waves): the share of SM-time the launch's tiles can fill
    compile_s: float
    problems: str  # "" when the launch passes every check


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def config_label(meta: dict, warps: int, stages: int) -> str:
    if "BLOCK_N" in meta:
        return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}:{warps}:{stages}"
    if "BLOCK_K" in meta:  # the quantise pass: row blocks over all of K
        return f"{meta['BLOCK_M']}x{meta['BLOCK_K']}:{warps}:{stages}"
    return f"BLOCK={meta.get('BLOCK', '?')}:{warps}:{stages}"


def launch_facts(args: dict, consts: dict) -> tuple[str, int]:
    """(shape label, programs) of one launch from its named arguments and constexprs."""
    if "K1" in args:  # fused_mm
        shape = f"{args['M']}x{args['N']}x{args['K1']}" + (f"+{args['K2']}" if args["K2"] else "")
        return shape, _cdiv(args["M"], consts["BLOCK_M"]) * _cdiv(args["N"], consts["BLOCK_N"]) * consts["SPLIT_K"]
    if "N" in args and "R" in args:  # the FP8 GEMM with its LoRA K segment
        return f"{args['M']}x{args['N']}x{args['K']}+{args['R']}", (
            _cdiv(args["M"], consts["BLOCK_M"]) * _cdiv(args["N"], consts["BLOCK_N"])
        )
    if "R" in args:  # the quantise pass: S [M, r] over K, and the FP8 format it writes
        fmt = str(args["q_ptr"].dtype).replace("torch.float8_", "")[:4]
        return f"{args['M']}x{args['R']}x{args['K']} {fmt}", _cdiv(args["M"], consts["BLOCK_M"])
    ints = [v for v in args.values() if isinstance(v, int) and not isinstance(v, bool)]
    return (f"n={ints[0]}" if ints else ""), 0  # the loss kernels: the element count


def mma_types(ptx: str) -> str:
    counts: dict[str, int] = {}
    for a, b in _MMA_TYPES.findall(ptx):
        counts[f"{a} x {b}"] = counts.get(f"{a} x {b}", 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in counts.items())


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
    """(registers, spill bytes) from ptxas -v, with the ptxas and register allocation Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [get_ptxas(arch).path, f"-arch={sm}", "-v", "--regAllocOptLevel=2", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return int(regs.group(1)) if regs else -1, (int(spills.group(1)) + int(spills.group(2))) if spills else -1


def _compile(jit, compile: dict, arch: int) -> Future:
    """Future of (compiled, regs, spills, smem, mma, mma types, pipelined, setp, error, seconds) of one
    specialization, compiled by Triton and ptxas -v in a worker thread while the step goes on."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(jit, compile["signature"], compile["constants"], compile["configs"][0])
    options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}

    def work() -> tuple:
        t0 = time.perf_counter()
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            ptx = kernel.asm["ptx"]
            regs, spills = _ptxas_report(ptx, arch)
        except Exception as e:  # noqa: BLE001 -- a failed compile is a result to report, not a crash
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            return False, -1, -1, -1, 0, "", False, 0, error, time.perf_counter() - t0
        setp = len(re.findall(r"^\s*(?:@%p\d+\s+)?setp\.", ptx, re.M))
        return (True, regs, spills, int(kernel.metadata.shared), ptx.count(MMA_INSTRUCTION[arch]), mma_types(ptx),
                "cp.async" in ptx, setp, "", time.perf_counter() - t0)  # fmt: skip

    return _POOL.submit(work)


class Recorder:
    """Compiles each distinct launch once, for ``arch``, instead of running it."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.case = ""
        self._pending: list[tuple[dict, Future]] = []
        self._seen: set = set()
        self._args: dict = {}

    def finish(self) -> list[Launch]:
        """Every launch recorded, with its compile facts (waits for the compiles) and the checks' problems."""
        launches = []
        for x, future in self._pending:
            compiled, regs, spills, smem, mma, types, pipelined, setp, err, seconds = future.result()
            problems = [f"compile failed: {err}"] if err else []
            if compiled:
                if spills != 0:
                    problems.append(f"{spills} bytes spilled")
                if smem > SMEM_LIMIT[self.arch]:
                    problems.append(f"shared memory {smem} > {SMEM_LIMIT[self.arch]}")
                if x["is_gemm"] and mma == 0:
                    problems.append(f"no {MMA_INSTRUCTION[self.arch]}")
                if x["is_gemm"] and x["stages"] > 1 and not pipelined:
                    problems.append("K loop not pipelined")
                if x["fp8"] and f"{x['fp8']}: " not in types:
                    problems.append(f"no {x['fp8']} MMA")
            sms, programs = NUM_SMS[self.arch], x["programs"]
            fill = programs / (sms * math.ceil(programs / sms)) if programs else 0.0
            launches.append(
                Launch(x["case"], x["kernel"], x["shape"], x["config"], compiled, regs, spills, smem, mma, types,
                       pipelined, x["even_k"], setp, programs, round(fill, 3), seconds if x["first"] else 0.0,
                       "; ".join(problems))
            )  # fmt: skip
        return launches

    def pre_run(self, jit, *args, **kwargs) -> None:  # Triton pre-run hook: the launch's arguments
        self._args = {**dict(zip(jit.arg_names, args)), **kwargs}

    def cache_hook(self, *, key, fn, compile, **_) -> bool:  # Triton jit_cache_hook
        jit = fn.jit_function
        names = jit.arg_names
        consts = {names[path[0]]: v for path, v in compile["constants"].items() if len(path) == 1}
        label = config_label(consts, compile["num_warps"], compile["num_stages"])
        shape, programs = launch_facts(self._args, consts)
        ident = (self.case, jit.fn.__name__, shape, str(key))
        if ident in self._seen:
            return True
        self._seen.add(ident)
        cache_key = (self.arch, jit.fn.__name__, str(key))
        first = cache_key not in _COMPILED
        if first:
            _COMPILED[cache_key] = _compile(jit, compile, self.arch)
        # EVEN_K2 describes the second (LoRA) loop, compiled only with HAS_SECOND.
        even = [k for k, v in consts.items() if k.startswith("EVEN_") and v is True]
        even = ",".join(sorted(k for k in even if k != "EVEN_K2" or consts.get("HAS_SECOND")))
        fp8 = [PTX_FP8.get(compile["signature"][x]) for x in ("a_ptr", "b_ptr") if x in compile["signature"]]
        launch = dict(case=self.case, kernel=jit.fn.__name__, shape=shape, config=label, even_k=even or "-",
                      programs=programs, is_gemm="BLOCK_K" in consts, stages=compile["num_stages"],
                      fp8=f"{fp8[0]} x {fp8[1]}" if len(fp8) == 2 and all(fp8) else "", first=first)  # fmt: skip
        self._pending.append((launch, _COMPILED[cache_key]))
        return True  # skip the real compile and the launch


def install(recorder: Recorder, modules: list, tuners: list, lists: list) -> Callable[[], None]:
    """Point Triton at the target-only driver and the recorder; returns the undo. ``lists``: per tuner, None
    (its own configs and pruning) or the configs to compile instead, each on every launch (no pruning)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    # Restored by hand: reset_active() would build the default driver, which fails with no GPU.
    previous_driver = getattr(driver, "_active", None)
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", recorder.arch, 32)))
    old_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = recorder.cache_hook
    undo_steps: list[Callable[[], None]] = []
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                hook = functools.partial(recorder.pre_run, obj)
                obj.add_pre_run_hook(hook)
                undo_steps.append(functools.partial(obj.pre_run_hooks.remove, hook))
        # The launchers refuse CPU tensors outside the interpreter; here nothing runs.
        undo_steps.append(functools.partial(setattr, mod, "check_device", mod.check_device))
        mod.check_device = lambda *tensors: None
    for tuner, configs in zip(tuners, lists, strict=True):
        # Every config the autotuner would time, each launch afresh (no result kept across launches): the
        # stand-in timer makes it launch, and so compile, each one.
        saved = dict(tuner.cache), tuner.configs, tuner.early_config_prune
        if configs is not None:
            tuner.configs, tuner.early_config_prune = configs, None

        def run(*args, _tuner=tuner, **kwargs):
            _tuner.cache.clear()
            return type(_tuner).run(_tuner, *args, **kwargs)

        tuner.run = run
        tuner.do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]
        undo_steps.append(functools.partial(_restore_tuner, tuner, *saved))

    def undo() -> None:
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(previous_driver)
        for step in reversed(undo_steps):
            step()

    return undo


def _restore_tuner(tuner, cache: dict, configs: list, prune) -> None:
    for attr in ("run", "do_bench"):
        tuner.__dict__.pop(attr, None)
    tuner.cache.clear()
    tuner.cache.update(cache)
    tuner.configs, tuner.early_config_prune = configs, prune
