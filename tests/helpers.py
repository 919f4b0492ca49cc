"""Helpers for the tests: finite differences, error measures, the data they train on, a stop signal at a step,
xpcnn as a process (a server started, an output on a full disk)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from xpcnn import nn
from xpcnn.data.idx import write_idx
from xpcnn.training.display import Progress

# The offline MNIST copy beside the repository (tests that need it skip without it).
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
REPOSITORY = Path(__file__).resolve().parents[1]


def started_server(run, *options: str) -> subprocess.Popen:
    """``xpcnn serve RUN --port 0 --device cpu [options]`` as a process, its stdout and stderr pipes of text."""
    return subprocess.Popen(
        [sys.executable, "-m", "xpcnn", "serve", str(run), "--port", "0", "--device", "cpu", *options],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def run_onto_a_full_disk(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``xpcnn ARGUMENTS > /dev/full``, buffered as by default (PYTHONUNBUFFERED left out): its stderr as text."""
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [sys.executable, "-m", "xpcnn", *arguments],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            timeout=timeout,
        )


def numerical_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar function ``f`` at float64 ``x`` (perturbed in place, restored)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + eps
        f_plus = f(x)
        x[index] = original - eps
        f_minus = f(x)
        x[index] = original
        grad[index] = (f_plus - f_minus) / (2 * eps)
    return grad


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error relative to the largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    return float(np.max(np.abs(actual - expected)) / scale) if scale > 0 else float(np.max(np.abs(actual), initial=0.0))


def write_synthetic_mnist(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Write the four MNIST IDX files of an easy synthetic 10-class problem into ``directory``.

    Each class is a random blob pattern; images are noisy uint8 copies of it.
    """
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((10, 28, 28)) > 0.7) * 200.0
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.clip(prototypes[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


class InterruptAt(Progress):
    """Sends this process ``signum`` (SIGINT, as Ctrl-C does; SIGTERM, as a scheduler does) once the given
    epoch reaches the given step."""

    def __init__(self, epoch, step, signum=signal.SIGINT):
        super().__init__(None)
        self.target, self.signum = (epoch, step), signum

    def update(self, step, loss, accuracy, images_per_second):
        if (self.epoch, step) == self.target:
            os.kill(os.getpid(), self.signum)


def residual_block(case: str, seed: int = 0) -> nn.Residual:
    """A residual block on (N, 2, H, W) inputs: ``"identity"`` (2 channels out, the identity shortcut),
    ``"projection"`` (4 channels at half the size, a strided 1x1 convolution as the shortcut) or
    ``"batch-norm"`` (the same with batch norm in the branch and after the projection, as in ResNet)."""
    rng = np.random.default_rng(seed)
    if case == "identity":
        return nn.Residual(
            nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, rng=rng), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1, rng=rng))
        )
    norm = case == "batch-norm"
    branch = [nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=not norm, rng=rng)]
    branch += [nn.BatchNorm2d(4)] if norm else []
    branch += [nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=not norm, rng=rng)]
    branch += [nn.BatchNorm2d(4)] if norm else []
    shortcut = nn.Conv2d(2, 4, 1, stride=2, bias=not norm, rng=rng)
    return nn.Residual(nn.Sequential(*branch), nn.Sequential(shortcut, nn.BatchNorm2d(4)) if norm else shortcut)


RESIDUAL_CASES = ("identity", "projection", "batch-norm")


def small_resnet(seed: int = 0, channels: int = 8, classes: int = 10) -> nn.Sequential:
    """A ResNet-style model for (N, 1, 28, 28) images: a strided stem, an identity block, a downsampling block
    with a projection, global average pooling and a linear classifier; batch norm throughout."""
    rng = np.random.default_rng(seed)
    c, d = channels, 2 * channels

    def conv_bn(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, rng=rng), nn.BatchNorm2d(cout)]

    return nn.Sequential(
        *conv_bn(1, c, stride=2),  # 28 -> 14
        nn.ReLU(),
        nn.Residual(nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c))),
        nn.ReLU(),
        nn.Residual(
            nn.Sequential(*conv_bn(c, d, stride=2), nn.ReLU(), *conv_bn(d, d)),  # 14 -> 7
            nn.Sequential(nn.Conv2d(c, d, 1, stride=2, bias=False, rng=rng), nn.BatchNorm2d(d)),
        ),
        nn.ReLU(),
        nn.GlobalAvgPool2d(),
        nn.Linear(d, classes, rng=rng, gain=nn.OUTPUT_GAIN),
    )
