#!/usr/bin/env bash
# The whole GPU check in one call (about 10 minutes at most; no network needed):
#   build the extension with its CUDA kernels, run the test suite, run a small subset of the ops
#   under compute-sanitizer (memcheck, racecheck), run the benchmarks, render the report.
# Everything lands in one folder: $OUT if set, else bench/results/gpu-<date>:
#   suite.log (every stage's full output), <date>-<gpu>.json, its PNG plots, report.md.
# Knobs: SUITE_LIMIT (seconds for everything, default 570), PYTHON (default python3),
#        BENCH_ARGS (extra arguments for python -m bench.run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LIMIT=${SUITE_LIMIT:-570}
T0=$(date +%s)
DIR=${OUT:-bench/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
LOG="$DIR/suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
SUMMARY=()

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }

# stage NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND under a timeout of
# min(MAX, time left - RESERVE), its output appended to the log; records its exit status.
stage() {
    local name=$1 max=$2 reserve=$3; shift 3
    local lim=$(( $(left) - reserve ))
    (( lim > max )) && lim=$max
    if (( lim < 5 )); then
        echo "=== $name: skipped (no time left)" | tee -a "$LOG"
        SUMMARY+=("$name: skipped (no time left)")
        return 124
    fi
    echo "=== $name (limit ${lim}s): $*" | tee -a "$LOG"
    local s=$(date +%s)
    timeout -k 10 "$lim" "$@" >> "$LOG" 2>&1
    local rc=$?
    local msg="rc=$rc in $(( $(date +%s) - s ))s"
    (( rc == 124 || rc == 137 )) && msg="$msg (TIMED OUT)"
    echo "=== $name: $msg" | tee -a "$LOG"
    SUMMARY+=("$name: $msg")
    return $rc
}

finish() {
    echo
    echo "=== summary ($(( $(date +%s) - T0 ))s, folder $DIR)" | tee -a "$LOG"
    printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
    [[ -f "$DIR/report.md" ]] && cat "$DIR/report.md"
    exit "${1:-0}"
}

# ---------------------------------------------------------------------------------- environment
{
    date -u; nvidia-smi 2>&1 | head -15
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >> "$LOG" 2>&1
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [[ -z "$CAP" ]]; then
    echo "no CUDA GPU visible to PyTorch" | tee -a "$LOG"
    finish 1
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME
SAN=$CUDA_HOME/bin/compute-sanitizer
[[ -x "$SAN" ]] || SAN=$(command -v compute-sanitizer || true)

# -------------------------------------------------------------------------------------- build
# Only this GPU's architecture: a third of the nvcc work of the default list.
TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=$(nproc) DABNET_CUDA=1 \
    stage build 300 200 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || finish 1
stage cuda-kernels-built 30 190 "$PY" -c "import dabnet_kernels as d, sys; print('CUDA kernels built:', d.has_cuda_kernels()); sys.exit(0 if d.has_cuda_kernels() else 1)"

# -------------------------------------------------------------------------------------- tests
stage tests 180 170 "$PY" -m pytest tests -x -q -p no:cacheprovider

# ------------------------------------------------------------------------------ sanitizers
if [[ -n "$SAN" ]]; then
    # No caching allocator: out-of-bounds accesses then hit unallocated memory and are caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 75 130 \
        "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 "$PY" -m bench.sanitize --quick
    stage racecheck 75 110 \
        "$SAN" --tool racecheck --error-exitcode 99 --print-limit 20 "$PY" -m bench.sanitize --quick
else
    echo "compute-sanitizer not found under $CUDA_HOME/bin or on PATH" | tee -a "$LOG"
    SUMMARY+=("sanitizers: compute-sanitizer not found")
fi

# ------------------------------------------------------------------------------- benchmarks
BL=$(( $(left) - 35 ))
(( BL > 30 )) && stage bench $BL 30 "$PY" -m bench.run --device cuda --no-progress \
    --time-limit $(( BL - 25 )) --out "$DIR" ${BENCH_ARGS:-}
shopt -s nullglob
JSONS=("$DIR"/*.json)
if (( ${#JSONS[@]} )); then
    stage report 60 0 "$PY" -m bench.report --plots "${JSONS[@]}" \
        && "$PY" -m bench.report "${JSONS[@]}" > "$DIR/report.md" 2>> "$LOG"
fi
finish 0
