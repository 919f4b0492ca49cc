#!/usr/bin/env bash
# On a CUDA machine, in one go: the whole test suite (CuPy, and torch and JAX
# on CUDA, join the backend fixture when a GPU is visible), the benchmark
# (xpcnn on cupy, torch and jax beside torch eager on the same GPU, plus one
# full MNIST epoch; then once more with TF32 matmuls on both sides), and
# optionally the accuracy recipes.  Every step writes
# its own log into OUT_DIR, so a step that fails or runs out of time leaves the
# others' results.
#
# Usage: scripts/gpu_check.sh [OUT_DIR] [MNIST_DIR] [FASHION_DIR]
#   GPU_CHECK_INSTALL=0   use the xpcnn importable as it is (default: pip install ".[test,cuda12]")
#   GPU_CHECK_RECIPES=1   also train the fast and best recipes (3 seeds) and Fashion-MNIST runs,
#                         concurrently on the one GPU, beside the tests (their seconds are then upper bounds)
#   GPU_CHECK_TF32=0      skip the second benchmark, with --tf32
#   GPU_CHECK_TEST_SECONDS, GPU_CHECK_BENCH_SECONDS, GPU_CHECK_RECIPE_SECONDS: time limits per step
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mnist=${2:-../shared/data/mnist}
fashion=${3:-/usr/share/datasets/fashion-mnist}
python=${PYTHON:-python3}
mkdir -p "$out"
# JAX takes 75% of the GPU at start-up by default; several test workers and runs share this GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

log() { echo "# $(date -u +%H:%M:%S) $*" | tee -a "$out/steps.txt"; }

log "xpcnn GPU check"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
        "$python" -m pip install --quiet ".[test,cuda12]" 2>&1 | tail -n 3
    fi
    "$python" -m xpcnn info
} > "$out/info.txt" 2>&1
log "info: exit $?"

recipe_pids=()
start_recipes() {
    # name, then xpcnn train arguments; each run in its own directory and log.
    local name=$1
    shift
    timeout "${GPU_CHECK_RECIPE_SECONDS:-1800}" "$python" -m xpcnn train --device cuda --out "$out/runs/$name" "$@" \
        > "$out/runs/$name.log" 2>&1 &
    recipe_pids+=($!)
}

log "benchmark"
full_run=()
[ -d "$mnist" ] && full_run=(--full-run "$mnist")
timeout "${GPU_CHECK_BENCH_SECONDS:-900}" "$python" -m xpcnn bench --backend cupy --backend torch --backend jax \
    --steps 50 --threads 2 --json "$out/bench.json" "${full_run[@]}" > "$out/bench.txt" 2>&1
log "benchmark: exit $?"
if [ "${GPU_CHECK_TF32:-1}" = 1 ]; then
    log "benchmark, TF32"
    timeout "${GPU_CHECK_BENCH_SECONDS:-900}" "$python" -m xpcnn bench --backend cupy --model convnet --tf32 \
        --steps 50 --threads 2 --json "$out/bench-tf32.json" "${full_run[@]}" > "$out/bench-tf32.txt" 2>&1
    log "benchmark, TF32: exit $?"
fi

if [ "${GPU_CHECK_RECIPES:-0}" = 1 ] && [ -d "$mnist" ]; then
    log "recipes (in the background)"
    mkdir -p "$out/runs"
    for seed in 0 1 2; do
        start_recipes "best-seed$seed" --recipe best --seed "$seed" --data-dir "$mnist"
    done
    start_recipes fast --recipe fast --data-dir "$mnist"
    if [ -d "$fashion" ]; then
        start_recipes fashion-convnet --dataset fashion-mnist --data-dir "$fashion" --epochs 10
        start_recipes fashion-fast --dataset fashion-mnist --data-dir "$fashion" --recipe fast
        start_recipes fashion-best --dataset fashion-mnist --data-dir "$fashion" --recipe best
    fi
fi

log "tests"
workers=()
"$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
OMP_NUM_THREADS=1 timeout "${GPU_CHECK_TEST_SECONDS:-900}" "$python" -m pytest -q -rfEs "${workers[@]}" \
    > "$out/tests.txt" 2>&1
log "tests: exit $?"

if [ ${#recipe_pids[@]} -gt 0 ]; then
    for pid in "${recipe_pids[@]}"; do wait "$pid"; done
    for run in "$out"/runs/*.log; do
        log "$(basename "$run" .log): $(tail -n 1 "$run")"
    done
fi
log "done"
