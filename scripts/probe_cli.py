#!/usr/bin/env python3
"""Hostile and careless uses of the xpcnn command line: each command's exit status and last line.

Builds damaged data sets, checkpoints and images in a temporary folder (``W`` in the table), runs
``xpcnn`` on them in subprocesses, and prints a Markdown table, the number of outputs holding a
traceback (should be 0), and whether each run directory can be resumed or restarted.  Uses the
synthetic data set of the tests (``tests/conftest.py``).

    python scripts/probe_cli.py
"""

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_synthetic_mnist  # noqa: E402

from xpcnn.data.idx import write_idx  # noqa: E402

TRAIN_IMAGES, TRAIN_LABELS, TEST_LABELS = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def xpcnn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xpcnn", *args], capture_output=True, text=True, timeout=300)


def damaged_data(root: Path, good: Path) -> dict[str, Path]:
    """Copies of the good data set, each broken one way."""
    broken = {name: root / name for name in ("garbage", "bad32", "flat", "bomb")}
    for folder in broken.values():
        shutil.copytree(good, folder)
    (broken["garbage"] / TRAIN_LABELS).write_bytes(b"garbage")
    write_idx(broken["bad32"] / TRAIN_IMAGES, np.zeros((600, 32, 32), np.uint8))
    write_idx(broken["flat"] / TRAIN_IMAGES, np.full((600, 28, 28), 9, np.uint8))
    with gzip.open(broken["bomb"] / TEST_LABELS, "wb") as bomb:  # 200 labels, then 200 MiB the header does not declare
        bomb.write(bytes([0, 0, 8, 1]) + (200).to_bytes(4, "big") + bytes(200))
        for _ in range(200):
            bomb.write(bytes(2**20))
    return broken


def damaged_runs(root: Path, run: Path) -> dict[str, Path]:
    """Checkpoints and run directories that are not what they should be."""
    files = {name: root / name for name in ("random.npz", "pickle.npz", "notnpz.npz", "truncated.npz")}
    files["random.npz"].write_bytes(os.urandom(3000))
    files["pickle.npz"].write_bytes(pickle.dumps({"a": 1}))
    with zipfile.ZipFile(files["notnpz.npz"], "w") as archive:
        archive.writestr("hello.txt", "hi")
    checkpoint = (run / "checkpoint.npz").read_bytes()
    files["truncated.npz"].write_bytes(checkpoint[: len(checkpoint) // 2])
    tampered = root / "tampered"
    shutil.copytree(run, tampered)
    with np.load(run / "checkpoint.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta.json"].tobytes())
    meta["state"]["epoch"], meta["classes"] = -3, ["a"]
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tampered / "checkpoint.npz", **arrays)
    no_checkpoint = root / "nockpt"
    no_checkpoint.mkdir()
    (no_checkpoint / "history.json").write_text("[]")
    (no_checkpoint / "config.json").write_text("{")
    return {**files, "tampered": tampered, "nockpt": no_checkpoint}


def damaged_images(root: Path) -> list[Path]:
    (root / "notes.png").write_text("not an image")
    np.save(root / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(root / "cube.npy", np.zeros((3, 3, 3, 3)))
    np.save(root / "empty.npy", np.zeros((0,)))
    np.save(root / "blank.npy", np.zeros((28, 28)))
    np.save(root / "nan.npy", np.full((28, 28), np.nan))
    (root / "adir.png").mkdir()
    names = ("notes.png", "obj.npy", "cube.npy", "empty.npy", "blank.npy", "nan.npy", "adir.png", "missing.png")
    return [root / name for name in names]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="xpcnn-probe-"))
    try:
        probe(root)
    finally:
        shutil.rmtree(root)


def probe(root: Path) -> None:
    """Make the data, runs and pictures under ``root``, run the commands on them, print the table."""
    good = write_synthetic_mnist(root / "good")
    other = write_synthetic_mnist(root / "other", seed=7)
    run = root / "run"
    xpcnn("train", "--model", "seed", "--epochs", "1", "--device", "cpu", "--data-dir", str(good), "--out", str(run))
    data = damaged_data(root, good)
    runs = damaged_runs(root, run)
    images = damaged_images(root)
    (root / "afile").write_text("x")
    g, r = str(good), str(run)
    cases = [
        ["train", "--data-dir", str(root / "missing")],
        *(["train", "--data-dir", str(data[name]), "--device", "cpu"] for name in ("garbage", "bad32", "flat", "bomb")),
        ["train", "--lr", "nan", "--data-dir", g],
        ["train", "--lr", "inf", "--data-dir", g],
        ["train", "--weight-decay", "inf", "--data-dir", g],
        ["train", "--momentum", "1", "--data-dir", g],
        ["train", "--batch-size", "0", "--data-dir", g],
        ["train", "--validation", "600", "--device", "cpu", "--data-dir", g],
        ["train", "--label-smoothing", "1", "--data-dir", g],
        ["train", "--out", str(root / "afile"), "--device", "cpu", "--data-dir", g, "--model", "seed"],
        ["train", "--out", r, "--data-dir", g],
        ["train", "--resume", str(runs["nockpt"])],
        ["train", "--resume", str(runs["tampered"]), "--epochs", "3"],
        ["train", "--resume", r, "--epochs", "2", "--data-dir", str(other), "--device", "cpu"],
        ["train", "--resume", r, "--lr", "0.1"],
        ["train", "--device", "cuda", "--data-dir", g],
        ["train", "--backend", "jax", "--device", "cuda", "--data-dir", g],
        ["train", "--backend", "cupy", "--data-dir", g],
        ["train", "--device", "tpu", "--data-dir", g],
        ["evaluate", str(root / "nothing.npz")],
        *(["evaluate", str(runs[name])] for name in ("random.npz", "pickle.npz", "notnpz.npz", "truncated.npz")),
        ["evaluate", str(runs["tampered"])],
        ["evaluate", r, "--data-dir", str(other)],
        ["evaluate", str(runs["nockpt"])],
        ["predict", r, *map(str, images)],
        ["predict", str(runs["random.npz"]), str(images[0])],
        ["bench", "--backend", "cupy"],
        ["bench", "--model", "vgg"],
        ["info"],
    ]
    tracebacks = 0
    print("| command | exit | message (last line) |\n| --- | ---: | --- |")
    for args in cases:
        done = xpcnn(*args)
        text = done.stdout + done.stderr
        tracebacks += "Traceback" in text
        last = ([line for line in text.splitlines() if line.strip()] or [""])[-1].replace(str(root), "W")
        command = " ".join(args).replace(str(root), "W")
        print(f"| `xpcnn {command}` | {done.returncode} | {last[:150]} |")
    print(f"\ncommands whose output held a traceback: {tracebacks} of {len(cases)}")
    for directory in (run, runs["tampered"], runs["nockpt"]):
        resumed = xpcnn("train", "--resume", str(directory), "--epochs", "3", "--device", "cpu", "--data-dir", g)
        restarted = xpcnn("train", "--out", str(directory), "--model", "seed", "--device", "cpu", "--data-dir", g)
        print(f"{directory.name}: --resume exit {resumed.returncode}, --out exit {restarted.returncode}")


if __name__ == "__main__":
    main()
