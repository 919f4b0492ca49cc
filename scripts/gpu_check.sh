#!/usr/bin/env bash
# On a CUDA machine: install the CuPy extra, run the whole test suite (CuPy
# joins the backend fixture when a GPU is visible) and the benchmark (xpcnn
# on numpy and cupy beside torch on cpu and cuda), writing everything to one
# file.  Usage: scripts/gpu_check.sh [OUTPUT_FILE] [MNIST_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check.txt}
data=${2:-../shared/data/mnist}
{
    echo "# xpcnn GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python -m pip install --quiet ".[test,cuda12]" 2>&1 | tail -n 3
    python -m xpcnn info
    echo "## tests"
    python -m pytest -q -rs 2>&1 | tail -n 40
    echo "## benchmark"
    full_run=()
    [ -d "$data" ] && full_run=(--full-run "$data")
    python -m xpcnn bench --backend numpy --backend cupy --json "${out%.txt}.json" "${full_run[@]}"
} > "$out" 2>&1
echo "wrote $out"
