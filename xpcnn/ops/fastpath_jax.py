"""JAX's convolution kernels for :mod:`xpcnn.ops.fastpath`: XLA's own convolutions instead of patch matrices.

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
The few shapes whose input-gradient convolution XLA:CPU aborts on take the
reference's input gradient (see :func:`aborts_xla`).

On the CPU the compiled steps also ask XLA to keep its operations on its own
kernels rather than YNNPACK's (:func:`compiler_options`): XLA:CPU (jaxlib
0.10) hands convolutions, products and reductions to YNNPACK by default, and
with Eigen's convolutions instead the convnet's compiled training step runs
1.8x faster on 2 cores (batch 64 and 128), its evaluation step 1.3x.
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
from jax import lax

from .. import functional as F

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
    y = _channels_last_conv(
        jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(weight, (2, 3, 1, 0)), tuple(stride), ((ph, ph), (pw, pw))
    )
    y = jnp.transpose(y, (0, 3, 1, 2))
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y, x


def aborts_xla(kernel, stride, padding, skipped, out_hw) -> bool:
    """Whether XLA:CPU (jaxlib 0.10.2) aborts the process compiling :func:`conv2d_backward`'s input gradient.

    Per axis (H, W): the forward kernel, stride, padding, input rows past the last window, output size.
    XLA's algebraic simplifier swaps a convolution's operands where the kernel outweighs the input (the
    product of the window sizes beats that of the input sizes; an input of 1 padded by KH-1 on both sides
    counts as KH), but leaves as it is an axis it takes for a group axis (window 2, stride 1, base dilation
    2, no padding: here forward kernel 2, stride 2, padding 1, no row skipped), also where that window does
    not fit the new kernel (an output size other than 2); its shape check then aborts ("Window dimensions
    do not match RHS shape").  A sweep over kernels, strides, paddings and sizes found no other crash.
    """
    group = [
        k == 2 and s == 2 and p == 1 and r == 0 for k, s, p, r in zip(kernel, stride, padding, skipped, strict=True)
    ]
    if not any(kept and o != 2 for kept, o in zip(group, out_hw, strict=True)):
        return False
    window = inputs = 1
    for k, p, r, o, kept in zip(kernel, padding, skipped, out_hw, group, strict=True):
        if not kept:
            window *= k
            inputs *= k if o == 1 and p == 0 and r == 0 else o
    return window > inputs


def conv2d_backward(grad_y, x, weight, x_shape, stride=(1, 1), padding=(0, 0), input_grad=True, bias_grad=True):
    """:func:`xpcnn.functional.conv2d_backward` from the forward input ``x``, as two XLA convolutions."""
    if _narrow(weight):
        return F.conv2d_backward(grad_y, x, weight, x_shape, stride, padding, input_grad, bias_grad)
    (_, _, h, w), (_, _, kh, kw) = x_shape, weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    # Input rows and columns past the last window (when the stride does not divide evenly) get no gradient.
    skipped_h, skipped_w = h + 2 * ph - kh - (oh - 1) * sh, w + 2 * pw - kw - (ow - 1) * sw
    # The weight gradient: the images' channels as the batch, the images as the features, over grad_y's windows.
    grad_w = _channels_last_conv(
        jnp.transpose(x, (1, 2, 3, 0)),  # (C, H, W, N)
        jnp.transpose(grad_y, (2, 3, 0, 1)),  # (OH, OW, N, O)
        (1, 1),
        ((ph, ph - skipped_h), (pw, pw - skipped_w)),
        rhs_dilation=(sh, sw),
    )  # (C, KH, KW, O)
    grad_w = jnp.transpose(grad_w, (3, 0, 1, 2))
    grad_b = F._column_sum(F._channel_matrix(grad_y)) if bias_grad else None
    if not input_grad:
        return None, grad_w, grad_b
    if aborts_xla((kh, kw), stride, padding, (skipped_h, skipped_w), (oh, ow)):
        grad_x = F.input_gradient(F._channel_matrix(grad_y), weight, x_shape, stride, padding)
        return grad_x, grad_w, grad_b
    grad_x = _channels_last_conv(
        jnp.transpose(grad_y, (0, 2, 3, 1)),  # (N, OH, OW, O)
        jnp.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1)),  # (KH, KW, O, C)
        (1, 1),
        ((kh - 1 - ph, kh - 1 - ph + skipped_h), (kw - 1 - pw, kw - 1 - pw + skipped_w)),
        lhs_dilation=(sh, sw),
    )
    return jnp.transpose(grad_x, (0, 3, 1, 2)), grad_w, grad_b


def _channels_last_conv(lhs, rhs, strides, padding, lhs_dilation=None, rhs_dilation=None):
    """``lax.conv_general_dilated`` of ``lhs`` (N, H, W, C) with ``rhs`` (KH, KW, C, O) -> (N, OH, OW, O).

    Channels last, in memory as well: XLA:CPU runs a convolution on its fast (Eigen) kernels only in this
    layout, and inside a loop (the epoch program) it keeps the operands' layout rather than choosing it, so
    NCHW operands there would get its naive loop nest, about ten times slower.
    """
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
