#!/usr/bin/env bash
# GPU one-shot for issues 15-17: device ceilings, kernel equality (bf16/fp16, PTX/spill/shared-memory
# checks), the loss and pooling microbenchmarks with their ablations, the ViT-B/16 train step (+ data),
# the step paths (eager / compiled / CUDA graph), the update, the paper-scale rank step, then the
# verdict table (benchmarks/gpu_summary.py), in about 9 minutes on one GPU, no network, nothing installed.
#
#   bash benchmarks/gpu_suite.sh OUTPUT_DIR            # e.g. bench_results/gpu/<device>_<date>
#   PYTHON=/path/to/python GPU_SUITE_BUDGET_S=540 bash benchmarks/gpu_suite.sh OUT
#
# * Runs from a plain copy of the repository: PYTHONPATH=<repo>. The `cosmos_fast.kernels` package is
#   mapped from kernels/ only by the editable install, so when `import cosmos_fast.kernels` does not
#   resolve into this repository the script makes a symlink cosmos_fast/kernels -> ../kernels in the
#   copy for the duration of the run (removed at exit; an existing non-link is never touched).
# * Checks its dependencies first (torch >= 2.4 with a visible CUDA GPU, triton >= 3.0, numpy, yaml,
#   PIL, open_clip, webdataset, pytest; matplotlib/DALI/deepspeed optional) and never pip-installs.
#   Works with what the lent machine has (torch 2.11 / triton 3.6 reported).
# * Every step has its own timeout inside an overall deadline (GPU_SUITE_BUDGET_S, default 540 s);
#   a failed or timed-out step is recorded and the suite continues. Exit status: 0 if every step
#   passed, 1 if any failed, 2 if a dependency is missing.
# * Outputs in OUTPUT_DIR: gpu_suite.log, pytest_kernels.xml, <bench>/<device>_<date>_<sha>.csv for
#   contrastive, cross_pool, train, train_data, PNGs and README.md (benchmarks/report.py), status.txt.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTPUT_DIR}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-540}
START=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/status.txt"
exec > >(tee -a "$OUT/gpu_suite.log") 2>&1
cd "$REPO" || exit 2
echo "gpu_suite: repo $REPO, output $OUT, python $PY, budget ${BUDGET}s, $(date -u +%FT%TZ)"

# ------------------------------------------------------------------ 1. dependencies (before anything)
"$PY" - <<'EOF'
import importlib, sys
required = ["torch", "triton", "numpy", "yaml", "PIL", "open_clip", "webdataset", "pytest"]
optional = ["matplotlib", "torchvision", "nvidia.dali", "deepspeed"]
missing = []
for name in required:
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("FAIL: missing required modules: " + ", ".join(missing))
    sys.exit(2)
for name in optional:
    try:
        importlib.import_module(name)
        print(f"optional {name}: present")
    except Exception as e:
        print(f"optional {name}: absent ({type(e).__name__}); the steps that need it are skipped or reduced")
import torch, triton
def ver(s):
    return tuple(int(x) for x in s.split("+")[0].split(".")[:2])
if ver(torch.__version__) < (2, 4) or ver(triton.__version__) < (3, 0):
    print(f"FAIL: need torch >= 2.4 and triton >= 3.0, have {torch.__version__} / {triton.__version__}")
    sys.exit(2)
if not torch.cuda.is_available():
    print("FAIL: no CUDA GPU visible to torch (this suite needs one; run the CPU benchmarks instead)")
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
      f"{triton.__version__}, GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
EOF
rc=$?
if [ $rc -ne 0 ]; then
    echo "deps FAIL" >> "$OUT/status.txt"
    exit 2
fi
echo "deps ok" >> "$OUT/status.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

# ------------------------------------------------------------------ 2. import shim for cosmos_fast.kernels
# The scripts put the repository first on sys.path (and `python -m pytest` puts the working directory
# first), so a shadowing package elsewhere on PYTHONPATH would lose: the shim is a symlink
# cosmos_fast/kernels -> ../kernels inside this copy, created only when the import does not already
# resolve into the repository, and removed at exit.
TMP="$(mktemp -d)"
LINK=""
cleanup() { [ -n "$LINK" ] && [ -L "$LINK" ] && rm -f "$LINK"; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
kernels_ok() {
    "$PY" -c "
import os, sys
import cosmos_fast.kernels as k
repo = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(k.__file__).startswith(repo + os.sep) else 1)" "$REPO" 2>/dev/null
}
if [ -z "${GPU_SUITE_FORCE_SHIM:-}" ] && kernels_ok; then
    echo "cosmos_fast.kernels imports from the repository (installed or mapped)"
elif [ -e "$REPO/cosmos_fast/kernels" ] && [ ! -L "$REPO/cosmos_fast/kernels" ]; then
    echo "FAIL: $REPO/cosmos_fast/kernels exists and is not a symlink; refusing to touch it"
    echo "shim FAIL" >> "$OUT/status.txt"
    exit 2
else
    if [ ! -e "$REPO/cosmos_fast/kernels" ]; then
        ln -s ../kernels "$REPO/cosmos_fast/kernels"
        LINK="$REPO/cosmos_fast/kernels"
    fi
    if kernels_ok; then
        echo "cosmos_fast.kernels mapped from kernels/ by a temporary symlink cosmos_fast/kernels"
    else
        echo "FAIL: cosmos_fast.kernels does not import even through the symlink"
        echo "shim FAIL" >> "$OUT/status.txt"
        exit 2
    fi
fi

# ------------------------------------------------------------------ helpers
STAMP="$TMP/stamp"
touch "$STAMP"
FAILED=0
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {   # step NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local left
    left=$(( $(remaining) - 10 ))
    if [ "$left" -lt 15 ]; then
        echo "== $name: SKIPPED (budget spent)"
        echo "$name skipped" >> "$OUT/status.txt"
        FAILED=1
        return
    fi
    local limit=$(( cap < left ? cap : left ))
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        echo "$name ok ${dt}s" >> "$OUT/status.txt"
    else
        [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s"
        echo "$name FAIL rc=$rc ${dt}s" >> "$OUT/status.txt"
        FAILED=1
    fi
}

# ------------------------------------------------------------------ 3. ceilings: copy, GEMM per dtype, fp64 atomics
step ceilings 30 "$PY" benchmarks/ceilings.py --results-dir "$OUT"

# ------------------------------------------------------------------ 4. kernel equality (bf16/fp16 on GPU)
# the GPU-only tests: bf16/fp16 within 2x torch's error, wgmma in the PTX / no spills / shared memory
# within the device limit (contrastive), the fused pooler, the graphed step and compiled blocks
# against eager, the fused update; with pytest-xdist (when installed) on 8 processes
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
step pytest_kernels 120 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_contrastive.py \
    tests/test_cross_pool.py tests/test_trainer.py::test_amp_training_on_cuda \
    tests/test_fused_update.py tests/test_caption_truncation.py tests/test_device_step.py tests/test_compile.py \
    --junitxml="$OUT/pytest_kernels.xml"
step compile_check_pool 20 env -u TRITON_INTERPRET "$PY" benchmarks/bench_cross_pool.py --compile-check 90

# ------------------------------------------------------------------ 5. kernel microbenchmarks
# the loss: reference / one-pass fused / its list API / the previous kernels / S only; 256-pass
# TFLOP/s against the GEMM rate; the per-kernel split; memory alone at 32768
step bench_contrastive 100 "$PY" benchmarks/bench_contrastive.py --sizes 1024 4096 16384 --memory-sizes 32768 \
    --dtype bfloat16 --providers reference fused fused:list fused_v1 fused_sonly --reps 10 --warmup 2 \
    --gemm-ceiling --kernel-split
step bench_cross_pool 40 "$PY" benchmarks/bench_cross_pool.py --reps 10 --warmup 3

# ------------------------------------------------------------------ 6. the step: ViT-B/16 at the official batch, + data
step bench_train 80 "$PY" benchmarks/bench_train.py --model ViT-B-16 --batch 64 --warmup 2 --reps 5 \
    --data-samples 256 --data-batch 64 --data-workers 8 --results-dir "$OUT"
# one rank at the paper's scale (B=32, W=128): official-style / + generic engineering / fast
step bench_rank 110 "$PY" benchmarks/bench_rank.py --out "$OUT" --reps 8 --warmup 2
# eager / compiled blocks / CUDA-graph step / both (compile time reported as first_steps_s)
step bench_step_paths 90 "$PY" benchmarks/bench_step_paths.py --model ViT-B-16 --batch 64 --warmup 5 --reps 8 \
    --results-dir "$OUT"
# caption truncation x the fused EMA + AdamW, and the update alone
step bench_update 40 "$PY" benchmarks/bench_update.py --model ViT-B-16 --batch 64 --warmup 2 --reps 5 \
    --results-dir "$OUT"

# ------------------------------------------------------------------ 7. collect CSVs written under the repo, report
find bench_results -type f -name '*.csv' -newer "$STAMP" 2>/dev/null | while read -r f; do
    rel=${f#bench_results/}
    mkdir -p "$OUT/$(dirname "$rel")"
    cp "$f" "$OUT/$rel"
done
step report 20 "$PY" benchmarks/report.py --results-dir "$OUT" --readme "$OUT/README.md"

# ------------------------------------------------------------------ 8. the verdict: every target next to this run's numbers
"$PY" benchmarks/gpu_summary.py "$OUT" || true

echo "---- status ($(( $(date +%s) - START ))s)"
cat "$OUT/status.txt"
exit $FAILED
