#!/usr/bin/env bash
# fastcog's GPU check in one command, for the device machine (one H100 / H200, torch 2.11 + triton
# 3.6 and peft installed, no diffusers / torchao / bitsandbytes, no network):
#
#   bash bench/gpu_check.sh [STAGE ...]
#
# Stages, in the order given (default: tests kernels 2b 5b):
#   tests    pytest -m gpu tests/kernels: the kernel parity suite natively at real shapes
#   gputests pytest -m gpu tests: every GPU-marked test (kernels included)
#   kernels  bench/kernel_bench.py: fused kernels vs eager vs torch.compile
#   sweep    bench/kernel_sweep.py: block-size sweep of the fused LoRA GEMM (16 candidates x every
#            launch of 3 shapes; prints the recommended _CONFIGS for kernels/lora_linear.py)
#   2b | 5b  bench/throughput.py, cogvideox-2b / cogvideox-5b, LoRA r=128, 49x480x720, batch 1, with
#            the ablation (reference path, fastcog path, each switch alone)
#   i2v | 1.5  the same for cogvideox-5b-i2v (49x480x720) / cogvideox1.5-5b (81x768x1360)
#
# One device call may run 600 s, so the whole check is best split over calls, e.g.
#   bash bench/gpu_check.sh tests kernels;  bash bench/gpu_check.sh 2b;  bash bench/gpu_check.sh 5b
# GPU_CHECK_BUDGET_S (default 570) bounds the whole command: a stage is started only with a minute
# left, each runs under `timeout` with what is left, and bench/throughput.py starts no ablation row
# in its last two minutes (its JSON is rewritten after every path, so a cut run keeps its rows).
#
# Packages: wheels found in wheels/ or .whl/ (e.g. diffusers, torchao and what they need that the
# machine lacks) are installed with pip --no-index --no-deps into /tmp/site, put first on
# PYTHONPATH; fastcog itself is installed editable (--no-deps --no-index), which is what makes
# `fastcog.kernels` resolve to kernels/.
#
# Output: with $OUT set (the device machine), $OUT/gpu_check.log (everything printed),
# $OUT/gpu_check_summary.md (environment, each stage's status and the tail of its output) and
# $OUT/gpu_check_results.tar.gz (every result file: throughput JSON / PNG, kernel tables, pytest
# logs), three files, within the device tool's limits. Without $OUT the result files go to
# bench/results/ and the log and summary beside them. The copy on the device machine has no .git:
# pass the commit in, e.g. FASTCOG_GIT_COMMIT=$(git rev-parse HEAD) FASTCOG_GIT_DIRTY=0.
#
# Without a CUDA device setup fails (every GPU test would be "skipped" and read as passed);
# GPU_CHECK_ALLOW_CPU=1 runs the plumbing anyway, as a dry run on a CPU machine.
#
# Exit status: 0 if every stage passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -n "${OUT:-}" ]; then
  DEST=$OUT
  RESULTS=$(mktemp -d /tmp/gpu_check.XXXXXX)/results
else
  DEST=bench/results
  RESULTS=bench/results
fi
mkdir -p "$DEST" "$RESULTS"
LOG=$DEST/gpu_check.log
SUMMARY=$DEST/gpu_check_summary.md
STATUS_FILE=$(mktemp /tmp/gpu_check_status.XXXXXX)  # main runs in a pipeline (a subshell): statuses go here
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests kernels 2b 5b)

remaining() { echo $((BUDGET - SECONDS)); }

setup() {
  local dir
  for dir in wheels .whl; do
    if compgen -G "$dir/*.whl" >/dev/null; then
      echo "installing $(ls "$dir"/*.whl | wc -l) wheels from $dir/ into /tmp/site"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$dir"/*.whl || return 1
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  done
  if ! "$PY" -c "import fastcog.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . || return 1
  fi
  "$PY" - <<'EOF' || return 1
import importlib, importlib.metadata as md, os
import torch
for pkg in ("torch", "triton", "diffusers", "peft", "transformers", "torchao", "bitsandbytes"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} MISSING")
print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for mod in ("fastcog.kernels", "diffusers", "peft"):
    importlib.import_module(mod)  # the benchmark cannot run without these
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    # Without a GPU every GPU test would be "skipped" and the stage would read "passed".
    raise SystemExit("no CUDA device: this is the GPU check (GPU_CHECK_ALLOW_CPU=1 for a plumbing dry run)")
EOF
}

status() {  # status NAME TEXT
  echo "- $1: $2" >>"$STATUS_FILE"
  echo "== $1: $2"
}

# run_stage NAME OUTFILE CMD...: runs CMD under what is left of the budget, output to OUTFILE and the log.
run_stage() {
  local name=$1 outfile=$2 left rc
  shift 2
  left=$(remaining)
  if [ "$left" -lt 60 ]; then
    status "$name" "skipped: ${left}s of the ${BUDGET}s budget left"
    return
  fi
  echo "== $name ($((left - 15))s at most): $*"
  timeout --kill-after=10 $((left - 15)) "$@" 2>&1 | tee "$outfile"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status "$name" passed ;;
    124 | 137) status "$name" "TIMED OUT (budget); partial results kept" ;;
    *) status "$name" "FAILED (exit $rc)" ;;
  esac
}

throughput() {  # throughput STAGE VARIANT FRAMES HEIGHT WIDTH
  local stage=$1 variant=$2 left
  left=$(remaining)
  run_stage "$stage" "$RESULTS/stdout_throughput_$stage.md" "$PY" bench/throughput.py --variant "$variant" \
    --frames "$3" --height "$4" --width "$5" --batch-size 1 --rank 128 --steps 6 --warmup 2 \
    --ablation --ablation-steps 3 --max-seconds $((left > 200 ? left - 150 : 30)) --out-dir "$RESULTS"
}

main() {
  echo "fastcog GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), stages: ${STAGES[*]}, budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  if ! setup; then
    status setup "FAILED: the stages cannot run (missing wheels? see above)"
    return 1
  fi
  local stage
  for stage in "${STAGES[@]}"; do
    case $stage in
      tests) run_stage tests "$RESULTS/pytest_gpu_kernels.log" "$PY" -m pytest -m gpu tests/kernels -q -rs ;;
      gputests) run_stage gputests "$RESULTS/pytest_gpu_all.log" "$PY" -m pytest -m gpu tests -q -rs ;;
      kernels) run_stage kernels "$RESULTS/kernels_stdout.log" "$PY" bench/kernel_bench.py --out "$RESULTS" ;;
      sweep) run_stage sweep "$RESULTS/kernel_sweep_stdout.log" "$PY" bench/kernel_sweep.py --out "$RESULTS" ;;
      2b) throughput 2b cogvideox-2b 49 480 720 ;;
      5b) throughput 5b cogvideox-5b 49 480 720 ;;
      i2v) throughput i2v cogvideox-5b-i2v 49 480 720 ;;
      1.5) throughput 1.5 cogvideox1.5-5b 81 768 1360 ;;
      *) status "$stage" "FAILED (unknown stage; use tests gputests kernels sweep 2b 5b i2v 1.5)" ;;
    esac
  done
}

write_summary() {
  {
    echo "# fastcog GPU check"
    echo
    echo "stages: ${STAGES[*]}; $(date -u +%Y-%m-%dT%H:%M:%SZ); ${SECONDS}s of a ${BUDGET}s budget"
    echo
    cat "$STATUS_FILE"
    local f
    for f in "$RESULTS"/stdout_throughput_*.md "$RESULTS"/kernels.md "$RESULTS"/kernel_sweep.md "$RESULTS"/pytest_gpu_*.log; do
      [ -f "$f" ] || continue
      echo
      echo "## $(basename "$f")"
      echo
      tail -n 60 "$f"
    done
  } >"$SUMMARY"
}

main 2>&1 | tee -a "$LOG"
write_summary
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_check_results.tar.gz" -C "$(dirname "$RESULTS")" results
fi
# Every stage asked for must have passed.
[ "$(grep -c ': passed$' "$STATUS_FILE")" -eq ${#STAGES[@]} ] && ! grep -qv ': passed$' "$STATUS_FILE"
