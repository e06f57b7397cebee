#!/usr/bin/env bash
# The whole GPU check in one call of at most 10 minutes (no network needed), most important first:
#   1. build the extension with its CUDA kernels (this GPU's architecture only);
#   2. the CUDA and Triton GPU tests (test_cuda, test_cuda_stress, test_triton*): no -x, Triton
#      autotuning off (DABNET_TRITON_AUTOTUNE=0: one config, no benchmarking on first calls);
#   3. the tests past 2**31 elements (-m large; they skip themselves below 80 GiB);
#   4. compute-sanitizer memcheck, racecheck, initcheck, synccheck on bench.sanitize (fp32 and
#      fp16, the neck's tile and global-memory paths);
#   5. the rest of the test suite; 6. the benchmarks and their report.
# Each stage gets at most its share of SUITE_LIMIT and leaves the later stages their reserve.
# Everything lands in one folder: $OUT if set, else bench/results/gpu-<date>:
#   suite.log (every stage's full output), <date>-<gpu>.json, its PNG plots, report.md (always
#   written: the benchmark report when there is one, then the stages' summary).
# Exit status: 0 only if every test and sanitizer stage passed in time; else 1.
# Knobs: SUITE_LIMIT (seconds for everything, default 540: a 600 s call less start-up and copies;
#        lower it to what is left of the session's device time), PYTHON (default python3),
#        BENCH_ARGS (extra arguments for python -m bench.run), SAN_ARGS (for bench.sanitize).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LIMIT=${SUITE_LIMIT:-540}
T0=$(date +%s)
DIR=${OUT:-bench/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
LOG="$DIR/suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 DABNET_TRITON_AUTOTUNE=0
SUMMARY=()
FAILED=()

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
pct() { echo $(( LIMIT * $1 / 100 )); }

# stage NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND under a timeout of
# min(MAX, time left - RESERVE), its output appended to the log; records its exit status
# (124: timed out or skipped for lack of time).
stage() {
    local name=$1 max=$2 reserve=$3; shift 3
    local lim=$(( $(left) - reserve ))
    (( lim > max )) && lim=$max
    if (( lim < 10 )); then
        echo "=== $name: SKIPPED (no time left)" | tee -a "$LOG"
        SUMMARY+=("$name: SKIPPED (no time left)")
        return 124
    fi
    echo "=== $name (limit ${lim}s): $*" | tee -a "$LOG"
    local s=$(date +%s) out="$DIR/stage.out"
    timeout -k 10 "$lim" "$@" > "$out" 2>&1
    local rc=$?
    cat "$out" >> "$LOG"
    local msg="rc=$rc in $(( $(date +%s) - s ))s"
    (( rc == 124 || rc == 137 )) && msg="$msg (TIMED OUT)"
    # pytest's closing line, when there is one
    msg="$msg $(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' \
        "$out" | tail -1 | tr -d '=' | sed 's/^ *//')"
    rm -f "$out"
    echo "=== $name: $msg" | tee -a "$LOG"
    SUMMARY+=("$name: $msg")
    return $rc
}

# must NAME MAX RESERVE COMMAND...: a stage whose failure fails the suite.
must() {
    stage "$@" || FAILED+=("$1")
}

finish() {
    local status=$1
    (( ${#FAILED[@]} )) && status=1
    {
        echo
        echo "## GPU suite: $( (( status == 0 )) && echo PASSED || echo FAILED)" \
            "($(( $(date +%s) - T0 ))s of ${LIMIT}s)"
        (( ${#FAILED[@]} )) && echo "Failed or not run in time: ${FAILED[*]}"
        echo
        (( ${#SUMMARY[@]} )) && printf -- '- %s\n' "${SUMMARY[@]}"
    } >> "$DIR/report.md"
    echo
    echo "=== summary ($(( $(date +%s) - T0 ))s, folder $DIR)" | tee -a "$LOG"
    (( ${#SUMMARY[@]} )) && printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
    cat "$DIR/report.md"
    (( status )) && echo "GPU SUITE FAILED: ${FAILED[*]:-see $LOG}" >&2
    exit "$status"
}

# no_go MESSAGE: the suite cannot run at all.
no_go() {
    echo "$1" | tee -a "$LOG"
    SUMMARY+=("environment: $1")
    FAILED+=(environment)
    finish 1
}

: > "$DIR/report.md"
# ---------------------------------------------------------------------------------- environment
"$PY" -c "import torch, pytest" >> "$LOG" 2>&1 \
    || no_go "$PY cannot import torch and pytest (see $LOG): set PYTHON to the Python with PyTorch"
{
    date -u; nvidia-smi 2>&1 | head -15
    "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >> "$LOG" 2>&1
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>> "$LOG")
[[ -n "$CAP" ]] || no_go "no CUDA GPU visible to PyTorch in $PY (see $LOG)"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME
SAN=$CUDA_HOME/bin/compute-sanitizer
[[ -x "$SAN" ]] || SAN=$(command -v compute-sanitizer || true)

# -------------------------------------------------------------------------------------- build
# Only this GPU's architecture: a third of the nvcc work of the default list.
if ! TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=$(nproc) DABNET_CUDA=1 \
        stage build "$(pct 45)" "$(pct 50)" "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    FAILED+=(build)
    finish 1
fi
must cuda-kernels-built 30 "$(pct 45)" "$PY" -c "import dabnet_kernels as d, sys; print('CUDA kernels built:', d.has_cuda_kernels()); sys.exit(0 if d.has_cuda_kernels() else 1)"

# -------------------------------------------------------------------------------- GPU tests
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
# pytest-xdist, where installed: 8 processes share the GPU (compiles and launches overlap)
PAR=()
"$PY" -c "import xdist" 2>/dev/null && PAR=(-n 8)
GPU_TESTS=(tests/test_cuda.py tests/test_cuda_stress.py tests/test_triton.py tests/test_triton_limits.py)
must gpu-tests "$(pct 40)" "$(pct 30)" "${PYTEST[@]}" "${PAR[@]}" -m "not large" "${GPU_TESTS[@]}"
must large-tensors "$(pct 12)" "$(pct 25)" "${PYTEST[@]}" -m large "${GPU_TESTS[@]}"

# ------------------------------------------------------------------------------ sanitizers
if [[ -n "$SAN" ]]; then
    SANITIZE=("$PY" -m bench.sanitize ${SAN_ARGS:-})
    SAN_OPTS=(--error-exitcode 99 --print-limit 20)
    # No caching allocator: each tensor its own allocation, so out-of-bounds and uninitialized
    # accesses are seen per tensor.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 must memcheck "$(pct 8)" "$(pct 18)" \
        "$SAN" --tool memcheck "${SAN_OPTS[@]}" "${SANITIZE[@]}"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 must initcheck "$(pct 8)" "$(pct 13)" \
        "$SAN" --tool initcheck "${SAN_OPTS[@]}" "${SANITIZE[@]}"
    must racecheck "$(pct 8)" "$(pct 8)" \
        "$SAN" --tool racecheck "${SAN_OPTS[@]}" "${SANITIZE[@]}" --layouts nchw
    must synccheck "$(pct 6)" "$(pct 5)" \
        "$SAN" --tool synccheck "${SAN_OPTS[@]}" "${SANITIZE[@]}" --layouts nchw
else
    echo "compute-sanitizer not found under $CUDA_HOME/bin or on PATH" | tee -a "$LOG"
    SUMMARY+=("sanitizers: compute-sanitizer not found")
    FAILED+=(sanitizers)
fi

# ------------------------------------------------------------------------- the other tests
OTHER=()
for f in tests/test_*.py; do
    [[ " ${GPU_TESTS[*]} " == *" $f "* ]] || OTHER+=("$f")
done
must other-tests "$(pct 20)" "$(pct 6)" "${PYTEST[@]}" "${PAR[@]}" -m "not large" "${OTHER[@]}"

# ------------------------------------------------------------------------------- benchmarks
BL=$(( $(left) - 25 ))
(( BL > 30 )) && stage bench $BL 25 "$PY" -m bench.run --device cuda --no-progress \
    --time-limit $(( BL - 20 )) --out "$DIR" ${BENCH_ARGS:-}
shopt -s nullglob
JSONS=("$DIR"/*.json)
if (( ${#JSONS[@]} )); then
    # plots are optional (matplotlib); the report is written whatever became of them
    stage plots 40 0 "$PY" -m bench.report --plots "${JSONS[@]}"
    "$PY" -m bench.report "${JSONS[@]}" >> "$DIR/report.md" 2>> "$LOG" \
        || echo "bench.report failed (see $LOG)" >> "$DIR/report.md"
else
    echo "No benchmark results (see $LOG)." >> "$DIR/report.md"
fi
finish 0
