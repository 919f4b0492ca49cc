"""One default MNIST epoch on JAX: the epoch program against the step programs, interleaved, and NumPy's accuracy.

    python scripts/bench_epoch_program.py DATA_DIR [--repeats 3] [--threads 2] [--no-numpy] [--output FILE]

Each repeat trains the default config (convnet, one epoch) once with the epoch program and once with one
compiled program per step, in turn, in this process (compile time is counted apart by the trainer, so
``seconds`` is training time alone); the ratio is taken per pair and its median printed.  The NumPy run
gives the accuracy the JAX runs are compared with (same seed, same permutation; other rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-numpy", action="store_true")
    parser.add_argument("--output")
    args = parser.parse_args()
    if "xpcnn" in sys.modules:
        raise SystemExit("set the threads before xpcnn loads")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)

    from xpcnn.backends.backend import get_backend
    from xpcnn.data.data import load_dataset
    from xpcnn.training.config import TrainConfig
    from xpcnn.training.runs import train_run

    dataset = load_dataset("mnist", args.data_dir)
    config = TrainConfig(epochs=1)
    jax = get_backend("jax", args.device)
    runs = {"epoch program": [], "step programs": []}
    with tempfile.TemporaryDirectory() as out:

        def one(backend, name, **options) -> dict:
            record = train_run(config, backend, dataset, Path(out) / f"{name}-{len(runs.get(name, []))}", **options)
            record = record.history[-1]
            line = f"{name}: {record['seconds']:.2f} s of training, test accuracy {record['test_accuracy']:.2%}"
            print(line + f" (+ {record.get('compile_seconds', 0):.1f} s compiling)", file=sys.stderr)
            return record

        for _ in range(args.repeats):
            runs["epoch program"].append(one(jax, "epoch program", epoch_program=True))
            runs["step programs"].append(one(jax, "step programs", epoch_program=False))
        numpy = None if args.no_numpy else one(get_backend("numpy"), "numpy")
    ratios = [
        steps["seconds"] / epoch["seconds"]
        for epoch, steps in zip(runs["epoch program"], runs["step programs"], strict=True)
    ]
    report = {
        "device": str(jax),
        "threads": args.threads,
        "seconds": {name: [r["seconds"] for r in records] for name, records in runs.items()},
        "test_accuracy": {name: [r["test_accuracy"] for r in records] for name, records in runs.items()},
        "speedup_per_pair": ratios,
        "numpy": None if numpy is None else {"seconds": numpy["seconds"], "test_accuracy": numpy["test_accuracy"]},
    }
    for name, seconds in report["seconds"].items():
        print(f"{name}: median {statistics.median(seconds):.2f} s of training per default epoch ({jax})")
    spread = f"per pair {min(ratios):.3f}-{max(ratios):.3f}"
    print(f"epoch program / step programs: {statistics.median(ratios):.3f}x ({spread})")
    if numpy is not None:
        print(f"numpy: {numpy['seconds']:.2f} s, test accuracy {numpy['test_accuracy']:.2%}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
