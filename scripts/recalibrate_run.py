"""A finished run's test figures before and after batch-norm recalibration, as --recalibrate-bn does at its end.

    python scripts/recalibrate_run.py RUN [--data-dir DIR] [--backend jax] [--device cpu]

Training is deterministic for a seed, so a run trained without --recalibrate-bn and recalibrated here
ends as the same run with the flag would: the running statistics re-estimated on the plain training
images, 1,000 at a time in their order (docs/results.md uses it to give the `fashion` recipe's three
runs the flag). The run directory is not changed; one JSON line is printed.
"""

from __future__ import annotations

import argparse
import json
import sys

from xpcnn.backends.backend import get_backend
from xpcnn.base.errors import XpcnnError
from xpcnn.data.checkpoint import checkpoint_path, load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.data.device_data import DeviceSplit
from xpcnn.nn import recalibrate_batchnorm
from xpcnn.training.runs import checkpoint_config, model_from_checkpoint, recorded_data_dir
from xpcnn.training.train import evaluate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run")
    parser.add_argument("--data-dir")
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        checkpoint = load_checkpoint(args.run)
        config = checkpoint_config(checkpoint)
        state = checkpoint.meta["state"]
        if config.validation or config.recalibrate_bn or (state["epoch"], state["step"]) != (config.epochs, 0):
            raise XpcnnError(f"{args.run}: expected a finished run without --validation or --recalibrate-bn")
        dataset = load_dataset(
            config.dataset, args.data_dir or recorded_data_dir(checkpoint, checkpoint_path(args.run).parent)
        )
        backend = get_backend(args.backend, args.device)
        model, norm = model_from_checkpoint(checkpoint, backend)
    except XpcnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with backend.activate():
        test = DeviceSplit.from_host(backend, dataset.test_images, dataset.test_labels, norm)
        before = evaluate(model, test, backend)
        train = DeviceSplit.from_host(backend, dataset.train_images, dataset.train_labels, norm)
        recalibrate_batchnorm(model, (images for images, _ in train.batches(1000)))
        after = evaluate(model, test, backend)
    figures = {"run": args.run, "test_accuracy": before.accuracy, "test_loss": before.loss}
    figures |= {"recalibrated_test_accuracy": after.accuracy, "recalibrated_test_loss": after.loss}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
