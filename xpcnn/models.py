"""Named architectures for 28x28 single-channel digits, 10 classes.

Each builder returns a :class:`~xpcnn.nn.Sequential` with host NumPy float32
parameters drawn from ``seed`` (He initialisation, LeCun for the output
layer): the same seed gives the same initial weights on every backend.  Move
it with ``model.to(backend)``.

Where a convolution is followed by max-pooling, the ReLU comes after the
pooling.  That is the same function as ReLU then max-pooling, with the same
gradients (ReLU is monotone, so it commutes with max, and the first maximum of
a window is positive exactly when the pooled value is), but the ReLU runs on
4x (16x for ``seed``) fewer values: on NumPy it cuts a tenth of a convnet
training step.
"""

from __future__ import annotations

import numpy as np

from .nn import OUTPUT_GAIN, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Residual, Sequential


def seed_model(seed: int = 0) -> Sequential:
    """The original notebook's network: conv 8@4x4, ReLU, max-pool 4/4, linear 288 -> 10."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 8, 4, rng=rng),  # 28 -> 25
        MaxPool2d(4),  # 25 -> 6
        ReLU(),
        Flatten(),
        Linear(8 * 6 * 6, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def lenet(seed: int = 0) -> Sequential:
    """LeNet-5 with ReLU and max-pooling: conv 6@5x5 pad 2, pool 2, conv 16@5x5, pool 2, 120, 84, 10."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 6, 5, padding=2, rng=rng),  # 28 -> 28
        MaxPool2d(2),  # -> 14
        ReLU(),
        Conv2d(6, 16, 5, rng=rng),  # -> 10
        MaxPool2d(2),  # -> 5
        ReLU(),
        Flatten(),
        Linear(16 * 5 * 5, 120, rng=rng),
        ReLU(),
        Linear(120, 84, rng=rng),
        ReLU(),
        Linear(84, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def lenet_bn(seed: int = 0) -> Sequential:
    """LeNet's two 5x5 convolutions with batch normalisation and one linear layer, for the quick recipe.

    conv 16@5x5, pool 2, conv 32@5x5, pool 2, linear 512 -> 10; each convolution is followed by batch
    normalisation (after its pooling) and ReLU.  Half a convnet's arithmetic, and it learns as fast.
    """
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 16, 5, bias=False, rng=rng),  # 28 -> 24
        MaxPool2d(2),  # -> 12
        BatchNorm2d(16),
        ReLU(),
        Conv2d(16, 32, 5, bias=False, rng=rng),  # -> 8
        MaxPool2d(2),  # -> 4
        BatchNorm2d(32),
        ReLU(),
        Flatten(),
        Linear(32 * 4 * 4, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def convnet(seed: int = 0) -> Sequential:
    """The default: conv 32@3x3, pool 2, conv 64@3x3, pool 2, dropout 0.25, linear 1600 -> 10."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 32, 3, rng=rng),  # 28 -> 26
        MaxPool2d(2),  # -> 13
        ReLU(),
        Conv2d(32, 64, 3, rng=rng),  # -> 11
        MaxPool2d(2),  # -> 5
        ReLU(),
        Flatten(),
        Dropout(0.25),
        Linear(64 * 5 * 5, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def convnet_bn(seed: int = 0) -> Sequential:
    """convnet with batch normalisation after each pooling (the convolutions then need no bias).

    Normalising after the pooling rather than before costs 4x less and works as well.
    """
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 32, 3, bias=False, rng=rng),  # 28 -> 26
        MaxPool2d(2),  # -> 13
        BatchNorm2d(32),
        ReLU(),
        Conv2d(32, 64, 3, bias=False, rng=rng),  # -> 11
        MaxPool2d(2),  # -> 5
        BatchNorm2d(64),
        ReLU(),
        Flatten(),
        Dropout(0.25),
        Linear(64 * 5 * 5, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def deepnet(seed: int = 0, width: int = 32) -> Sequential:
    """Three convolutions with batch normalisation, for the best recipe.

    conv width@5x5, pool 2, conv 2*width@3x3, conv 2*width@3x3, pool 2, dropout 0.4,
    linear 2*width*16 -> 10; each convolution is followed by batch normalisation
    (after its pooling) and ReLU.
    """
    rng = np.random.default_rng(seed)
    wide = 2 * width
    return Sequential(
        Conv2d(1, width, 5, bias=False, rng=rng),  # 28 -> 24
        MaxPool2d(2),  # -> 12
        BatchNorm2d(width),
        ReLU(),
        Conv2d(width, wide, 3, bias=False, rng=rng),  # -> 10
        BatchNorm2d(wide),
        ReLU(),
        Conv2d(wide, wide, 3, bias=False, rng=rng),  # -> 8
        MaxPool2d(2),  # -> 4
        BatchNorm2d(wide),
        ReLU(),
        Flatten(),
        Dropout(0.4),
        Linear(wide * 4 * 4, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def widenet(seed: int = 0, dropout: float = 0.1, width: int = 32) -> Sequential:
    """Three 3x3 convolutions of width, 2*width and 4*width channels with batch normalisation, for the fashion recipe.

    conv width@3x3, pool 2, conv 2*width@3x3 pad 1, pool 2, conv 4*width@3x3 pad 1, dropout,
    linear 4*width*36 -> 10; each convolution is followed by batch normalisation (after its pooling)
    and ReLU.  The padded convolutions keep the 13x13 and 6x6 maps whole: the edges of clothing carry
    the class.
    """
    rng = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, width, 3, bias=False, rng=rng),  # 28 -> 26
        MaxPool2d(2),  # -> 13
        BatchNorm2d(width),
        ReLU(),
        Conv2d(width, 2 * width, 3, padding=1, bias=False, rng=rng),  # -> 13
        MaxPool2d(2),  # -> 6
        BatchNorm2d(2 * width),
        ReLU(),
        Conv2d(2 * width, 4 * width, 3, padding=1, bias=False, rng=rng),  # -> 6
        BatchNorm2d(4 * width),
        ReLU(),
        Flatten(),
        Dropout(dropout),
        Linear(4 * width * 6 * 6, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def resnet_small(seed: int = 0, width: int = 32, dropout: float = 0.1) -> Sequential:
    """A small ResNet for the fashion recipe: a 28x28 stem, a residual block at 14x14 and one at 7x7.

    conv width@3x3 pad 1, BN, ReLU, pool 2; block(width); conv 2*width@3x3 pad 1, pool 2, BN, ReLU;
    block(2*width); dropout; linear 2*width*49 -> 10.  A block is conv, BN, ReLU, conv, BN plus the
    identity, then ReLU.  About 2.4x widenet's arithmetic (14.6 million multiply-adds an image at width
    32); the head keeps the 7x7 map whole rather than averaging it away, as the edges of clothing
    carry the class.
    """
    rng = np.random.default_rng(seed)

    def block(channels: int) -> Sequential:
        branch = Sequential(
            Conv2d(channels, channels, 3, padding=1, bias=False, rng=rng),
            BatchNorm2d(channels),
            ReLU(),
            Conv2d(channels, channels, 3, padding=1, bias=False, rng=rng),
            BatchNorm2d(channels),
        )
        return Sequential(Residual(branch), ReLU())

    return Sequential(
        Conv2d(1, width, 3, padding=1, bias=False, rng=rng),  # 28
        BatchNorm2d(width),
        ReLU(),
        MaxPool2d(2),  # -> 14
        block(width),
        Conv2d(width, 2 * width, 3, padding=1, bias=False, rng=rng),
        MaxPool2d(2),  # -> 7
        BatchNorm2d(2 * width),
        ReLU(),
        block(2 * width),
        Flatten(),
        Dropout(dropout),
        Linear(2 * width * 7 * 7, 10, rng=rng, gain=OUTPUT_GAIN),
    )


def deepnet_wide(seed: int = 0) -> Sequential:
    """deepnet with 1.5x the channels (48, 96, 96): 2.2x the arithmetic."""
    return deepnet(seed, width=48)


def resnet_wide(seed: int = 0) -> Sequential:
    """resnet_small with 1.5x the channels (48, 96): about 2.2x the arithmetic, 1.7x the seconds a step on 2 cores."""
    return resnet_small(seed, width=48)


MODELS = {
    "seed": seed_model,
    "lenet": lenet,
    "lenet-bn": lenet_bn,
    "convnet": convnet,
    "convnet-bn": convnet_bn,
    "deepnet": deepnet,
    "deepnet-wide": deepnet_wide,
    "widenet": widenet,
    "resnet-small": resnet_small,
    "resnet-wide": resnet_wide,
}


def build(name: str, seed: int = 0) -> Sequential:
    """The named model with weights drawn from ``seed``."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}") from None
    return builder(seed)
