#!/usr/bin/env bash
# On a CUDA machine, in one go: the whole test suite (CuPy, and torch and JAX
# on CUDA, join the backend fixture when a GPU is visible), the benchmark
# (xpcnn on cupy, torch and jax beside torch eager on the same GPU, plus one
# full MNIST epoch; then once more with TF32 matmuls on both sides), and
# optionally the accuracy recipes.  Every step writes
# its own log into OUT_DIR, so a step that fails or runs out of time leaves the
# others' results.
#
# Usage: scripts/gpu_check.sh [--quick [--dry-run-cpu]] [OUT_DIR] [MNIST_DIR] [FASHION_DIR]
#   GPU_CHECK_INSTALL=0   use the xpcnn importable as it is (default: pip install ".[test,cuda12]")
#   GPU_CHECK_RECIPES=1   also train the fast and best recipes (3 seeds) and Fashion-MNIST runs,
#                         concurrently on the one GPU, beside the tests (their seconds are then upper bounds)
#   GPU_CHECK_TF32=0      skip the second benchmark, with --tf32
#   GPU_CHECK_TEST_SECONDS, GPU_CHECK_BENCH_SECONDS, GPU_CHECK_RECIPE_SECONDS: time limits per step
#   with --quick: GPU_CHECK_BENCH_RUNS (default "float32"), GPU_CHECK_LATER_RUNS (default "tf32 reference"),
#   GPU_CHECK_BATCHES (default "128 512"), GPU_CHECK_BENCH_MODELS (default "--model convnet --model seed"),
#   GPU_CHECK_BACKENDS (default "jax cupy"), GPU_CHECK_DEFAULT_EPOCHS (default 1),
#   GPU_CHECK_RECIPE_RUNS (default "quick": recipes timed alone on the first backend; "best" may join),
#   GPU_CHECK_SEARCH=1 (the Fashion-MNIST recipe search, scripts/gpu_recipes.sh, after the tests)
#
# --quick: what matters most first, all within GPU_CHECK_QUICK_SECONDS (default 300) on a fresh machine with
# no network: (1) convnet and seed on jax-cuda (the step programs and the epoch program, timed in turn) and on
# CuPy, each interleaved with torch eager on the same GPU, batch 128 and 512; (2) one default MNIST epoch and the
# fast recipe on each of cupy and jax, the recipes of GPU_CHECK_RECIPE_RUNS on jax, and two warm default epochs
# of each of jax's programs (scripts/bench_epoch_program.py); (3) the GPU cases of the test suite
# (-k "cupy or cuda"), with GPU_CHECK_SEARCH=1 then the Fashion-MNIST recipe search; then, with what
# time is left, the benchmark with TF32 and with every fast path off (XPCNN_FASTPATH=0, batch 128 only) and a
# profile of a CuPy step (scripts/profile_step.py).  Installs nothing but the wheels in .whl/ (array-api-compat,
# -extra, -strict) into /tmp/site, and imports xpcnn from this checkout; MNIST_DIR defaults to .data/mnist where
# it exists.  --dry-run-cpu runs the same flow on the CPU with tiny settings (jax and numpy beside torch on
# cpu, a synthetic data set unless MNIST_DIR is given, a few tests).  With --quick the exit status is 1 when a
# step that ran failed (one skipped for want of time is not a failure); relative paths are the caller's.
set -uo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
quick=0
dry=0
args=()
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --dry-run-cpu) quick=1 dry=1 ;;
        *) args+=("$arg") ;;
    esac
done
set -- "${args[@]}"
from_caller() { case $1 in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }  # a path given is the caller's
out=${1:-gpu_check}
[ $# -ge 1 ] && out=$(from_caller "$1")
mnist=${2:-../shared/data/mnist}
[ $# -ge 2 ] && mnist=$(from_caller "$2")
fashion=${3:-/usr/share/datasets/fashion-mnist}
[ $# -ge 3 ] && fashion=$(from_caller "$3")
python=${PYTHON:-python3}
mkdir -p "$out"
# JAX takes 75% of the GPU at start-up by default; several test workers and runs share this GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

log() { echo "# $(date -u +%H:%M:%S) $*" | tee -a "$out/steps.txt"; }

if [ "$quick" = 1 ]; then
    budget=${GPU_CHECK_QUICK_SECONDS:-300}
    failed=0
    # step NAME CAP_SECONDS COMMAND...: run under timeout (CAP, or what is left of the budget), output to NAME.log.
    step() {
        local name=$1 cap=$2 left=$((budget - SECONDS))
        shift 2
        [ "$left" -lt "$cap" ] && cap=$left
        if [ "$cap" -lt 10 ]; then
            log "$name: skipped, out of time"
            return 1
        fi
        local start=$SECONDS
        timeout "$cap" "$@" > "$out/$name.log" 2>&1
        local status=$?
        log "$name: exit $status ($((SECONDS - start)) s, limit $cap s)$([ $status = 124 ] && echo ', timed out')"
        [ "$status" = 0 ] || failed=1
        return $status
    }
    device=cuda backends=(${GPU_CHECK_BACKENDS:-jax cupy}) batches=(128 512) bench_size=(--steps 50 --repeats 7)
    tests=(-k "cupy or cuda")
    if [ "$dry" = 1 ]; then
        device=cpu backends=(jax numpy) batches=(16 32) bench_size=(--steps 2 --repeats 2)
        tests=(tests/test_layers.py -k numpy)
        [ -n "${2:-}" ] || mnist=$out/synthetic-mnist
    elif [ -z "${2:-}" ] && [ -d .data/mnist ]; then
        mnist=.data/mnist
    fi
    [ -z "${3:-}" ] && [ -d .data/fashion-mnist ] && fashion=.data/fashion-mnist
    [ "$dry" = 1 ] && [ -z "${3:-}" ] && fashion=$mnist  # the synthetic images stand in for clothing
    site=/tmp/site
    [ "$dry" = 1 ] && site=$out/site  # not the shared /tmp of a CPU machine
    log "xpcnn GPU check, quick$([ "$dry" = 1 ] && echo ', dry run on the CPU'): budget $budget s, data $mnist"
    export PYTHONPATH=$site:$PWD
    {
        if compgen -G ".whl/*.whl" > /dev/null; then
            "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
            echo "installed into $site: $(cd .whl && echo *.whl)"
        fi
        [ "$dry" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        timeout 60 "$python" -m xpcnn info
    } > "$out/info.log" 2>&1
    log "info: exit $? ($SECONDS s)"
    if [ "$dry" = 1 ] && [ ! -d "$mnist" ]; then
        "$python" -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_synthetic_mnist as w; w(__import__('pathlib').Path(sys.argv[1]))" "$mnist"
    fi

    export OMP_NUM_THREADS=1
    # bench_runs RUNS...: xpcnn on each backend beside torch eager, interleaved, on the same device, for each
    # batch: float32, tf32 (both sides), reference (every fast path off, XPCNN_FASTPATH=0, the first batch only).
    bench_runs() {
        local run batch name
        for run in "$@"; do
            for batch in ${GPU_CHECK_BATCHES:-${batches[*]}}; do
                [ "$run" = reference ] && [ "$batch" != "${batches[0]}" ] && continue  # the reference at one batch
                name=bench-b$batch$([ "$run" = float32 ] || echo "-$run")
                XPCNN_FASTPATH=$([ "$run" = reference ] && echo 0 || echo 1) \
                step "$name" 120 "$python" -m xpcnn bench "${backends[@]/#/--backend=}" \
                    ${GPU_CHECK_BENCH_MODELS:---model convnet --model seed} --train-batch "$batch" "${bench_size[@]}" \
                    --threads 2 $([ "$run" = tf32 ] && echo --tf32) --output "$out/$name.json"
                [ -f "$out/$name.json" ] && "$python" - "$out/$name.json" <<'EOF' | tee -a "$out/steps.txt"
import json, sys

def spread(row, key):
    return f"{row[key]:.2f} ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})" if key in row else "-"

for row in json.load(open(sys.argv[1]))["results"]:
    if row["framework"] != "xpcnn":
        continue
    if "error" in row:
        print(f"  {row['model']} on {row['backend']}: failed: {row['error']}")
        continue
    line = (f"  {row['model']} on {row['backend']} ({row['device']}): train {row['train_images_per_second']:,.0f} img/s,"
            f" x torch {spread(row, 'train_ratio')}; infer {row['infer_images_per_second']:,.0f} img/s,"
            f" x torch {spread(row, 'infer_ratio')}")
    if "train_epoch_images_per_second" in row:
        line += (f"; epoch program: train {row['train_epoch_images_per_second']:,.0f} img/s, x torch "
                 f"{spread(row, 'train_epoch_ratio')}, x the step programs {spread(row, 'epoch_vs_step')}")
    print(line)
EOF
            done
        done
    }

    # 1. jax (the step programs, then the epoch program) and CuPy beside torch eager, float32.
    bench_runs ${GPU_CHECK_BENCH_RUNS:-float32}

    # 2. One default MNIST epoch, and the fast recipe, on the device: training seconds and test accuracy.
    summarize_run() {
        "$python" - "$1" <<'EOF' | tee -a "$out/steps.txt"
import json, sys

history = json.load(open(f"{sys.argv[1]}/history.json"))
seconds = [record["seconds"] for record in history]
each = ", ".join(f"{s:.2f}" for s in seconds)
accuracy = history[-1]["test_accuracy"]
print(f"  {len(history)} epoch(s): {sum(seconds):.1f} s of training ({each}), test accuracy {accuracy:.2%}")
EOF
    }
    for backend in "${backends[@]}"; do
        step "train-default-$backend" 60 "$python" -m xpcnn train --backend "$backend" --device "$device" \
            --epochs "${GPU_CHECK_DEFAULT_EPOCHS:-1}" --data-dir "$mnist" --out "$out/runs/default-$backend" \
            && summarize_run "$out/runs/default-$backend"
        step "train-fast-$backend" 75 "$python" -m xpcnn train --backend "$backend" --recipe fast --device "$device" \
            --data-dir "$mnist" --out "$out/runs/fast-$backend" && summarize_run "$out/runs/fast-$backend"
    done

    for recipe in ${GPU_CHECK_RECIPE_RUNS:-quick}; do
        step "train-$recipe-${backends[0]}" 90 "$python" -m xpcnn train --backend "${backends[0]}" --recipe "$recipe" \
            --device "$device" --data-dir "$mnist" --out "$out/runs/$recipe-${backends[0]}" \
            && summarize_run "$out/runs/$recipe-${backends[0]}"
    done
    # Warm default epochs: both of jax's programs in turn, twice, in one process (compiling counted apart).
    if [ "${backends[0]}" = jax ]; then
        step epoch-warm 90 "$python" scripts/bench_epoch_program.py "$mnist" --device "$device" --repeats 2 \
            --no-numpy --output "$out/epoch-warm.json"
        [ -f "$out/epoch-warm.log" ] && grep -E "median|x \(per pair" "$out/epoch-warm.log" | sed 's/^/  /' \
            | tee -a "$out/steps.txt"
    fi

    # 3. The GPU cases of the test suite, CuPy's fused kernels first; then the recipe search, alone (beside the
    # tests, on 2026-12-04, each starved the other).
    [ "$dry" = 1 ] || step fused-tests 60 "$python" -m pytest -q -rfEs -p no:cacheprovider tests/test_fastpath_cupy.py
    [ -f "$out/fused-tests.log" ] && log "fused-tests: $(tail -n 1 "$out/fused-tests.log")"
    workers=()
    "$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
    step tests 120 "$python" -m pytest -q -rfEs -p no:cacheprovider "${workers[@]}" "${tests[@]}"
    log "tests: $(tail -n 1 "$out/tests.log")"
    if [ "${GPU_CHECK_SEARCH:-0}" = 1 ]; then
        GPU_RECIPES_DEVICE=$device step search 480 scripts/gpu_recipes.sh "$out/search" "$fashion"
        [ -f "$out/search.log" ] && sed 's/^/  /' "$out/search.log" | tee -a "$out/steps.txt"
    fi

    # 4. With what time is left: TF32 and the reference, and where a CuPy step's time goes.
    bench_runs ${GPU_CHECK_LATER_RUNS:-tf32 reference}
    [ "$dry" = 1 ] || step profile 30 "$python" scripts/profile_step.py --model convnet --model seed
    [ -f "$out/profile.log" ] && grep "batch" "$out/profile.log" | sed 's/^/  /' | tee -a "$out/steps.txt"
    log "done ($SECONDS s)$([ $failed = 1 ] && echo ', a step failed')"
    exit $failed
fi

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
    --steps 50 --threads 2 --output "$out/bench.json" "${full_run[@]}" > "$out/bench.txt" 2>&1
log "benchmark: exit $?"
if [ "${GPU_CHECK_TF32:-1}" = 1 ]; then
    log "benchmark, TF32"
    timeout "${GPU_CHECK_BENCH_SECONDS:-900}" "$python" -m xpcnn bench --backend cupy --model convnet --tf32 \
        --steps 50 --threads 2 --output "$out/bench-tf32.json" "${full_run[@]}" > "$out/bench-tf32.txt" 2>&1
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
