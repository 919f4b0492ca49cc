"""JAX's convolution kernels for :mod:`xpcnn.fastpath`: XLA's own convolutions instead of patch matrices.

Inside a compiled step the reference convolution's im2col (a stack of KH*KW
strided slices, then one product) is what XLA runs as written, and it pays
for the patch matrix in memory traffic; ``lax.conv_general_dilated`` runs
the same correlation as one convolution kernel.  The backward pass is two
more convolutions, written out here (no autodiff):

* input gradient: the output gradient, dilated by the stride and padded by
  KH-1-PH (and the rows the forward stride skipped), correlated with the
  flipped kernel with its in/out channels swapped;
* weight gradient: the input correlated with the output gradient, the batch
  axis playing the channels' part and the stride becoming a kernel dilation.

The cache the forward pass keeps for backward is the input itself.  Layers
with narrow patch matrices (C*KH*KW <= 25: first layers on one-channel
images) keep the reference, which is faster there (see :data:`NARROW_PATCHES`).

On the CPU the compiled steps also ask XLA to keep its operations on its own
kernels rather than YNNPACK's (:func:`compiler_options`): XLA:CPU (jaxlib
0.10) hands convolutions, products and reductions to YNNPACK by default, and
with Eigen's convolutions instead the convnet's compiled training step runs
1.8x faster on 2 cores (batch 64 and 128), its evaluation step 1.3x.
"""

from __future__ import annotations

from functools import cache

import jax
from jax import lax

from . import functional as F

_NCHW = ("NCHW", "OIHW", "NCHW")


# Up to this many patch columns (C*KH*KW), the reference's patch matrix and product beat XLA's convolution.
NARROW_PATCHES = 25


# XLA's own kernels instead of YNNPACK's (an empty list of the operations YNNPACK may take).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@cache
def _xla_knows(options: tuple) -> bool:
    """Whether this jaxlib's XLA has these options (older ones, from before YNNPACK, reject them by name)."""
    try:
        jax.jit(lambda x: x).lower(0.0).compile(compiler_options=dict(options))
    except jax.errors.JaxRuntimeError:
        return False
    return True


def compiler_options(device) -> dict:
    """XLA options for programs compiled for ``device`` (a ``jax.Device``): :data:`CPU_COMPILER_OPTIONS` on the CPU."""
    if device.platform != "cpu" or not _xla_knows(tuple(CPU_COMPILER_OPTIONS.items())):
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def _narrow(weight) -> bool:
    """Whether a convolution with ``weight`` (O, C, KH, KW) keeps the reference path (first layers on images)."""
    _, c, kh, kw = weight.shape
    return c * kh * kw <= NARROW_PATCHES


def conv2d_forward(x, weight, bias, stride=(1, 1), padding=(0, 0)):
    """:func:`xpcnn.functional.conv2d_forward` as one XLA convolution; the cache is ``x``.

    Narrow patches (see :data:`NARROW_PATCHES`) keep the reference, whose cache is the patch matrix.
    """
    if _narrow(weight):
        return F.conv2d_forward(x, weight, bias, stride, padding)
    (ph, pw) = padding
    y = lax.conv_general_dilated(
        x, weight, tuple(stride), ((ph, ph), (pw, pw)), dimension_numbers=_NCHW, precision=lax.Precision.HIGHEST
    )
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y, x


def conv2d_backward(grad_y, x, weight, x_shape, stride=(1, 1), padding=(0, 0), input_grad=True, bias_grad=True):
    """:func:`xpcnn.functional.conv2d_backward` from the forward input ``x``, as two XLA convolutions."""
    if _narrow(weight):
        return F.conv2d_backward(grad_y, x, weight, x_shape, stride, padding, input_grad, bias_grad)
    (_, _, h, w), (_, _, kh, kw) = x_shape, weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    # Input rows and columns past the last window (when the stride does not divide evenly) get no gradient.
    skipped_h, skipped_w = h + 2 * ph - kh - (oh - 1) * sh, w + 2 * pw - kw - (ow - 1) * sw
    grad_w = lax.conv_general_dilated(
        x,
        grad_y,
        (1, 1),
        ((ph, ph - skipped_h), (pw, pw - skipped_w)),
        rhs_dilation=(sh, sw),
        dimension_numbers=("CNHW", "IOHW", "CNHW"),
        precision=lax.Precision.HIGHEST,
    )
    grad_b = F._column_sum(F._channel_matrix(grad_y)) if bias_grad else None
    if not input_grad:
        return None, grad_w, grad_b
    grad_x = lax.conv_general_dilated(
        grad_y,
        weight[:, :, ::-1, ::-1],
        (1, 1),
        ((kh - 1 - ph, kh - 1 - ph + skipped_h), (kw - 1 - pw, kw - 1 - pw + skipped_w)),
        lhs_dilation=(sh, sw),
        dimension_numbers=("NCHW", "IOHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )
    return grad_x, grad_w, grad_b
