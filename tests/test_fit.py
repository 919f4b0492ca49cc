"""A tiny fit on synthetic digits: the loss must fall, on every backend."""

import numpy as np

from xpcnn import nn, optim

LOSS_DROP = 100.0  # the stated factor: the last epoch's mean loss is at least 100x below the first's


def synthetic_digits(n=300, size=12, classes=5, seed=0):
    """``n`` noisy copies of ``classes`` random blob prototypes, (n, 1, size, size) float32, labels (n,)."""
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((classes, size, size)) > 0.6).astype(np.float32)
    labels = rng.integers(0, classes, n)
    images = prototypes[labels] + 0.3 * rng.standard_normal((n, size, size)).astype(np.float32)
    return images[:, None], labels


def test_tiny_fit_loss_falls(backend):
    images, labels = synthetic_digits()
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, rng=0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(4 * 5 * 5, 5, rng=1),
    ).to(backend)
    model.set_generator(backend.generator(0))
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model, lr=0.05, momentum=0.9)
    x, y = backend.asarray(images), backend.asarray(labels)
    epoch_losses = []
    for _epoch in range(8):
        total = 0.0
        for start in range(0, len(labels), 30):
            opt.zero_grad()
            loss = loss_fn.forward(model.forward(x[start : start + 30, ...]), y[start : start + 30])
            model.backward(loss_fn.backward())
            opt.step()
            total += float(loss)
        epoch_losses.append(total / 10)
    assert epoch_losses[-1] * LOSS_DROP <= epoch_losses[0], epoch_losses
