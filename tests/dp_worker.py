"""One rank of the data-parallel tests: train a small float64 model with a Trainer and save what it ended with.

Usage: python tests/dp_worker.py BACKEND BN|PLAIN EPOCHS OUT (the rank from the environment, as under any
launcher; ``{rank}`` in OUT is replaced by it).  Also imported by tests/test_data_parallel.py, which runs the
same function in one process.
"""

import sys

import numpy as np

from xpcnn.backends import ranks
from xpcnn.backends.backend import get_backend
from xpcnn.data.device_data import DeviceSplit, Normalization
from xpcnn.nn import BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from xpcnn.training.config import TrainConfig, make_optimizer
from xpcnn.training.train import Trainer

IMAGES = 100  # a short last batch of 4 images with batch 32: it splits evenly over 2 ranks
BATCH = 32


def model(batch_norm: bool) -> Sequential:
    rng = np.random.default_rng(0)
    # A layer before batch norm has no bias: its gradient would be rounding noise (batch norm removes it).
    norm2d, norm1d = (BatchNorm2d(4), BatchNorm1d(16)) if batch_norm else (ReLU(), ReLU())
    conv = Conv2d(1, 4, 3, bias=not batch_norm, rng=rng)
    linear = Linear(4 * 13 * 13, 16, bias=not batch_norm, rng=rng)
    return Sequential(conv, norm2d, ReLU(), MaxPool2d(2), Flatten(), linear, norm1d, ReLU(), Linear(16, 10, rng=rng))


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (IMAGES, 28, 28), dtype=np.uint8), rng.integers(0, 10, IMAGES)


def train(backend_name: str, batch_norm: bool, epochs: int, communicator) -> dict:
    """Parameters, buffers and the last history record after ``epochs`` epochs of SGD with Nesterov momentum."""
    backend = get_backend(backend_name, "cpu")
    net = model(batch_norm).to(backend, np.float64)
    config = TrainConfig(model="convnet-bn", epochs=epochs, batch_size=BATCH, lr=0.05, log_every=2)
    images, labels = data()
    norm = Normalization.of(images)
    split = DeviceSplit.from_host(backend, images, labels, norm, dtype=backend.xp.float64)
    trainer = Trainer(net, make_optimizer(config, net), backend, config, communicator=communicator)
    state = trainer.fit(split, {"test": split})
    record = {f"history.{k}": np.float64(v) for k, v in state.history[-1].items() if "second" not in k}
    return {**net.state_dict(), **record}


if __name__ == "__main__":
    name, kind, epochs, out = sys.argv[1:]
    ranks.prepare(name)
    communicator = ranks.join(get_backend(name, "cpu"))
    np.savez(out.format(rank=communicator.rank), **train(name, kind == "BN", int(epochs), communicator))
