#!/usr/bin/env bash
# The Fashion-MNIST recipe search on one GPU (issue 24): every candidate of scripts/recipe_candidates.py's
# "fashion" list, with each seed, trains at once in a process of its own on JAX (validation split only);
# the candidate with the best mean last-epoch validation accuracy is then trained on the whole training set
# with seeds 0, 1 and 2, and only those runs print test figures.  Every run writes one JSON line per epoch
# into OUT_DIR; summary lines go to stdout and OUT_DIR/summary.txt.
#
# Usage: scripts/gpu_recipes.sh OUT_DIR FASHION_DIR
#   GPU_RECIPES_CANDIDATES   the candidates (default: the six that fit the CPU recipe's 30 minutes)
#   GPU_RECIPES_SEEDS        validation seeds (default "0 1")
#   GPU_RECIPES_SECONDS      time limit for each of the two rounds (default 240)
#   GPU_RECIPES_DEVICE       JAX's device (default cuda)
#   GPU_RECIPES_OPTIONS      more options for recipe_candidates.py (a dry run: "--validation 100 --epochs-cap 1")
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_recipes.sh OUT_DIR FASHION_DIR}
data=${2:?usage: scripts/gpu_recipes.sh OUT_DIR FASHION_DIR}
python=${PYTHON:-python3}
candidates=(${GPU_RECIPES_CANDIDATES:-widenet-30-epochs widenet-48-30-epochs widenet-64-20-epochs resnet
    resnet-30-epochs resnet-30-epochs-smoothing})
seeds=(${GPU_RECIPES_SEEDS:-0 1})
options=(--device "${GPU_RECIPES_DEVICE:-cuda}" ${GPU_RECIPES_OPTIONS:-})
seconds=${GPU_RECIPES_SECONDS:-240}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$out/summary.txt"; }

# round NAME...: train each candidate with each seed (validation), or with --test, the seeds 0 1 2.
round() {
    local kind=$1 name seed
    shift
    local run_seeds=("${seeds[@]}") flags=()
    [ "$kind" = test ] && run_seeds=(0 1 2) flags=(--test)
    local start=$SECONDS
    for name in "$@"; do
        for seed in "${run_seeds[@]}"; do
            local run=$out/$kind-$name-seed$seed
            {
                timeout "$seconds" "$python" scripts/recipe_candidates.py "$data" fashion "$name" --seed "$seed" \
                    "${flags[@]}" "${options[@]}" > "$run.jsonl" 2> "$run.log"
                echo $? > "$run.status"
            } &
        done
    done
    wait
    say "# $kind round: $# candidate(s) x ${#run_seeds[@]} seed(s) in $((SECONDS - start)) s"
}

round val "${candidates[@]}"
# The choice: a table of every run and candidate, then the chosen one's name on the last line.
"$python" - "$out" "${candidates[@]}" > "$out/choice.txt" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
scores = {}
for name in names:
    last, finished = [], True
    for path in sorted(out.glob(f"val-{name}-seed*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        status = path.with_suffix(".status").read_text().strip()
        text = ", ".join(f"{r['val_accuracy']:.2%}" for r in lines[-3:])
        seconds = sum(r["seconds"] for r in lines)
        print(f"  {path.stem}: exit {status}, {len(lines)} epoch(s) in {seconds:.1f} s, last three val {text}")
        finished = finished and status == "0" and bool(lines)
        last += [r["val_accuracy"] for r in lines[-1:]]
    # Only candidates whose every seed ran to the end compete.
    if last and finished:
        scores[name] = statistics.mean(last)
for name, score in sorted(scores.items(), key=lambda item: -item[1]):
    print(f"  {name}: mean last-epoch validation accuracy {score:.2%}")
print(max(scores, key=scores.get) if scores else "")
EOF
head -n -1 "$out/choice.txt" | tee -a "$out/summary.txt"
chosen=$(tail -n 1 "$out/choice.txt")
if [ -z "$chosen" ]; then
    say "# no candidate finished: nothing chosen"
    exit 1
fi
say "# chosen on validation: $chosen"
round test "$chosen"
"$python" - "$out" "$chosen" <<'EOF' | tee -a "$out/summary.txt"
import json, statistics, sys
from pathlib import Path

out, name = Path(sys.argv[1]), sys.argv[2]
finals = []
for seed in (0, 1, 2):
    run = out / f"test-{name}-seed{seed}"
    lines = [json.loads(line) for line in run.with_suffix(".jsonl").read_text().splitlines() if line.startswith("{")]
    status = run.with_suffix(".status").read_text().strip()
    if lines:
        last = lines[-1]
        seconds = sum(r["seconds"] for r in lines)
        print(
            f"  {run.name}: exit {status}, {len(lines)} epoch(s) in {seconds:.1f} s,"
            f" test accuracy {last['test_accuracy']:.2%}"
        )
        if status == "0":
            finals.append(last["test_accuracy"])
if finals:
    print(f"  {name}: mean test accuracy {statistics.mean(finals):.2%} over {len(finals)} finished seed(s)")
EOF
