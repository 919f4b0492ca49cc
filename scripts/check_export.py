#!/usr/bin/env python3
"""Export a trained run to ONNX and compare ONNX Runtime with xpcnn on every test image.

Both get the same raw float32 images in [0, 1] (uint8 / 255); xpcnn normalises them as
``xpcnn predict`` does, the ONNX graph does it itself.  Prints the number of images whose
predicted class differs and the largest difference of a class probability; exits with status 1
if any class differs or a probability differs by more than 1e-5.

    python -m xpcnn train --data-dir DIR --device cpu --out /tmp/exp-run    # 1 epoch of convnet
    python scripts/check_export.py /tmp/exp-run [--data-dir DIR]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

from xpcnn.apps.export import export
from xpcnn.backends.backend import get_backend
from xpcnn.base.errors import XpcnnError
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.data.device_data import normalize_images
from xpcnn.training.runs import checkpoint_config, model_from_checkpoint
from xpcnn.training.train import predict_probabilities

TOLERANCE = 1e-5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--data-dir", help="directory holding the dataset's IDX files (default: where the run's were)")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.run)
    numpy = get_backend("numpy", "cpu")
    model, norm = model_from_checkpoint(checkpoint, numpy)
    data_dir = args.data_dir or checkpoint.meta.get("data", {}).get("directory")
    dataset = load_dataset(checkpoint_config(checkpoint).dataset, data_dir, download=False)
    images = dataset.test_images[:, None].astype(np.float32) / np.float32(255)

    expected = predict_probabilities(model, normalize_images(numpy, images, norm))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        export(model, norm, "onnx", path, softmax=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (actual,) = session.run(["probabilities"], {"images": images})

    disagreements = int(np.sum(actual.argmax(axis=1) != expected.argmax(axis=1)))
    max_difference = float(np.abs(actual - expected).max())
    labels = dataset.test_labels
    print(f"{checkpoint.path}: {checkpoint_config(checkpoint).model}, {len(labels):,} {dataset.name} test images")
    accuracy = {name: np.mean(p.argmax(axis=1) == labels) for name, p in (("xpcnn", expected), ("onnx", actual))}
    print(f"accuracy: xpcnn {accuracy['xpcnn']:.2%}, onnxruntime {accuracy['onnx']:.2%}")
    print(f"class disagreements: {disagreements}")
    print(f"max probability difference: {max_difference:.3g} (tolerance {TOLERANCE:g})")
    return 0 if disagreements == 0 and max_difference <= TOLERANCE else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except XpcnnError as exc:  # a missing run or data: one line, as xpcnn's commands say it
        sys.exit(f"error: {exc}")
