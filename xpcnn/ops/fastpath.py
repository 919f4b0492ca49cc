"""The seam for backend-specific fast paths.

Layers get their math from :func:`kernels`: the Array API reference
(:mod:`xpcnn.functional`) for every backend, with a few functions replaced by
NumPy-specific versions for NumPy arrays, by fused kernels for CuPy arrays
(:mod:`xpcnn.ops.fastpath_cupy`, imported at the first CuPy array) and by XLA's
convolutions for JAX arrays (:mod:`xpcnn.ops.fastpath_jax`, which also chooses
the XLA options of JAX's compiled steps, :func:`compiler_options`).  Each
replacement must give the same result as the reference (tests compare them on
random inputs, ties included), and exists because a measurement showed it
pays.  ``XPCNN_FASTPATH=0`` in the environment turns them all off.

NumPy replacements (each re-measured against the reference it replaces,
which was restructured for the fewest operations, the count that matters on
a GPU; on NumPy's one thread per ufunc these still pay):

* non-overlapping max-pooling (stride == kernel, the common case): a
  knockout tournament of ``maximum`` over the strided windows instead of the
  reference's window copy, ``max`` and ``argmax`` (21x faster forward for a
  (128, 32, 26, 26) input: NumPy's argmax over a last axis of 4 is slow);
  the tournament is resolved into one mask per window offset, and the
  backward pass writes ``grad * mask`` straight into each strided window of
  the output with ``out=`` (6x faster than the reference's broadcast
  ``where``); a gradient that arrives in NCHW memory is first copied to
  channels-last, the masks' layout; inference takes the running maximum of
  the windows (2-5x faster than ``max`` over the window axes);
* im2col: the copy with the longest contiguous runs for the input's layout
  (see :func:`im2col`; 7x faster for the 28x28 input layer), with columns
  ordered (kh, kw, c), so the convolution uses its own weight matrix and
  weight gradient to match;
* the convolution's input gradient: one product per kernel offset into a
  reused buffer, then long-run accumulations (see :func:`input_gradient`;
  3.5x faster than the reference's correlation for the convnet's second layer);
* the ReLU gradient as a product with the mask (see :func:`relu_backward`);
* batch normalisation's statistics as column sums in BLAS (see :func:`batchnorm_forward`), and
  its weight gradient as a product and a column sum (see :func:`_column_dot`);
* the process's allocator: the first use of NumPy's fast paths has glibc's malloc keep freed
  memory for the next step's arrays rather than hand it back to the OS (see
  :func:`keep_freed_memory`; 1.1-1.6x the training images per second, by model).
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache, partial
from types import SimpleNamespace

import numpy as np
from array_api_compat import is_cupy_array, is_jax_array
from numpy.lib.stride_tricks import as_strided

from .. import functional as F


def _window_masks(record, count: int, parent=None) -> list:
    """One boolean mask per window offset from a tournament record: where that window held the first maximum."""
    if record is None:
        return [np.ones((), bool) if parent is None else parent]
    later_won, left_record, right_record = record
    middle = count // 2
    left = ~later_won if parent is None else parent & ~later_won
    right = later_won if parent is None else parent & later_won
    return _window_masks(left_record, middle, left) + _window_masks(right_record, count - middle, right)


def maxpool2d_forward(x, kernel, stride, record: bool = True):
    """:func:`xpcnn.functional.maxpool2d_forward` by the tournament; for tiling windows the record is window masks."""
    if tuple(stride) != tuple(kernel):
        return F.maxpool2d_forward(x, kernel, stride, record)
    windows = F._pool_windows(x, kernel, stride)
    if not record:
        return F._window_max(np, windows), None
    y, tree = F._tournament(np, windows)
    return y, _window_masks(tree, kernel[0] * kernel[1])


def batchnorm_forward(x, weight, bias, eps: float):
    """:func:`xpcnn.functional.batchnorm_forward` with the means as column sums in BLAS.

    ``np.mean`` and ``np.var`` over the rows of a (rows, C) matrix run on one
    thread; products with a ones vector run on every core (2.2x faster for a
    (64, 32, 13, 13) input on 2 cores).
    """
    matrix = F._channel_matrix(x)
    rows = matrix.shape[0]
    mean = F._column_sum(matrix) / rows
    centred = matrix - mean
    var = F._column_sum(centred * centred) / rows
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = centred * inv_std
    y = x_hat * weight + bias
    return F._from_channel_matrix(y, tuple(x.shape)), x_hat, inv_std, mean, var


def _column_dot(a, b):
    """sum(a * b) per column as a product and a column sum in BLAS: on NumPy 1.6-2.8x faster than the
    reference's (C, C) product for batch norm's gradients in the convnet-bn and deepnet models."""
    return F._column_sum(a * b)


def relu_backward(grad_y, y):
    """:func:`xpcnn.functional.relu_backward` as a product with the mask.

    NumPy runs ufuncs in memory order, so the product stays fast on the NCHW
    views of channels-last data that convolutions produce, where ``where``
    walks them against the grain (8x slower for a (128, 32, 26, 26) input).
    """
    return grad_y * (y > 0)


def maxpool2d_backward(grad_y, record, x_shape, kernel, stride):
    """:func:`xpcnn.functional.maxpool2d_backward`, writing each window's share in place for tiling windows."""
    if tuple(stride) != tuple(kernel):
        return F.maxpool2d_backward(grad_y, record, x_shape, kernel, stride)
    (kh, kw), (n, c, h, w) = kernel, x_shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    if not grad_y.transpose(0, 2, 3, 1).flags.c_contiguous:
        # Match the masks' channels-last memory (e.g. after Flatten's backward): ufuncs
        # over mixed layouts run several times slower than one copy costs.
        grad_y = np.ascontiguousarray(grad_y.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    grad = np.empty((n, h, w, c), grad_y.dtype).transpose(0, 3, 1, 2)  # channels-last memory, NCHW view
    grad[:, :, oh * kh :, :] = 0  # rows and columns no window covers
    grad[:, :, :, ow * kw :] = 0
    for k, mask in enumerate(record):
        i, j = divmod(k, kw)
        np.multiply(grad_y, mask, out=grad[:, :, i : i + kh * (oh - 1) + 1 : kh, j : j + kw * (ow - 1) + 1 : kw])
    return grad


def im2col(x, kernel, stride, padding):
    """:func:`xpcnn.functional.im2col` with columns ordered (kh, kw, c), choosing the copy with the longest runs.

    * channels-last input with C >= 8 and unit column stride (what a
      convolution feeds the next one): the KW*C values of a kernel row are
      contiguous, so each patch row is one strided view and the copy moves
      KW*C-value runs instead of the reference's C-value runs (1.5x faster
      for C = 32);
    * anything else (a batch of images, few channels): made NCHW-contiguous,
      then the patches are built transposed, (KH*KW*C, N*OH*OW), one image row
      (OW values) per copy run, and returned as a transposed view, which the
      BLAS products take as is (7x faster for the 28x28 input layer).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = F.output_size(h, kh, sh, ph), F.output_size(w, kw, sw, pw)
    x_nhwc = x.transpose(0, 2, 3, 1)
    if c >= 8 and sw == 1 and x_nhwc.flags.c_contiguous:
        if ph or pw:
            x_nhwc = np.pad(x_nhwc, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        s_n, s_h, s_w, s_c = x_nhwc.strides
        rows = [
            as_strided(x_nhwc[:, i:], (n, oh, ow, kw * c), (s_n, sh * s_h, s_w, s_c), writeable=False)
            for i in range(kh)
        ]
        return np.stack(rows, axis=3).reshape(n * oh * ow, kh * kw * c)
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else np.ascontiguousarray(x)
    rows = [
        x[:, channel, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
        for channel in range(c)
    ]
    return np.stack(rows).reshape(kh * kw * c, n * oh * ow).T


def _weight_matrix(weight):
    """Conv weight (O, C, KH, KW) as (O, KH*KW*C), matching :func:`im2col`'s column order."""
    o = weight.shape[0]
    return weight.transpose(0, 2, 3, 1).reshape(o, -1)


def _weight_gradient(grad, cols, weight_shape):
    """Weight gradient (O, C, KH, KW), contiguous, from grad (N*OH*OW, O) and :func:`im2col`'s (kh, kw, c) patches.

    ``cols.T @ grad`` is faster than ``grad.T @ cols`` for the usual shapes.
    """
    o, c, kh, kw = weight_shape
    return np.ascontiguousarray((cols.T @ grad).reshape(kh, kw, c, o).transpose(3, 2, 0, 1))


def input_gradient(grad, weight, x_shape, stride, padding):
    """:func:`xpcnn.functional.input_gradient` with one product per kernel offset.

    ``grad @ W[:, offset]`` lands in a reused buffer that is contiguous in
    (OW, C), so each of the KH*KW accumulations runs over long rows instead of
    C-value runs of one wide product (1.3x faster for the convnet's second layer).
    """
    (n, c, h, w), (_, _, kh, kw) = x_shape, weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = F.output_size(h, kh, sh, ph), F.output_size(w, kw, sw, pw)
    weight_rows = weight.transpose(2, 3, 0, 1)  # (KH, KW, O, C)
    grad_x = np.zeros((n, h + 2 * ph, w + 2 * pw, c), grad.dtype)
    buffer = np.empty((grad.shape[0], c), grad.dtype)
    for i in range(kh):
        for j in range(kw):
            np.matmul(grad, weight_rows[i, j], out=buffer)
            grad_x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :] += buffer.reshape(n, oh, ow, c)
    return grad_x[:, ph : ph + h, pw : pw + w, :].transpose(0, 3, 1, 2)


def _public(module) -> dict:
    return {name: getattr(module, name) for name in dir(module) if not name.startswith("_")}


_NUMPY = SimpleNamespace(
    **{
        **_public(F),
        "conv2d_forward": partial(F.conv2d_forward, im2col=im2col, weight_matrix=_weight_matrix),
        "conv2d_backward": partial(F.conv2d_backward, input_gradient=input_gradient, weight_gradient=_weight_gradient),
        "maxpool2d_forward": maxpool2d_forward,
        "maxpool2d_backward": maxpool2d_backward,
        "relu_backward": relu_backward,
        "batchnorm_forward": batchnorm_forward,
        "batchnorm_backward": partial(F.batchnorm_backward, column_dot=_column_dot),
    }
)


# glibc's mallopt parameters (malloc.h), and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCKS_UP_TO = 32 * 1024 * 1024


@cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process for the next allocations; True where it did.

    A NumPy training step allocates and frees the same large temporaries every step (patch matrices,
    batch norm's centred inputs: megabytes each).  By default glibc hands them back to the OS (blocks
    over its mmap threshold are unmapped when freed, and the heap's free top is trimmed), so the next
    step faults every page in again: 390,000 minor page faults in 40 steps of deepnet at batch 128.
    Taking blocks up to 32 MiB from the heap and never trimming it: 24,000, and in ``xpcnn bench`` on
    2 cores 1.4x the training images per second for convnet, 1.6x for deepnet, 1.1-1.25x for
    resnet-small (docs/benchmarks.md).  The price is that the process keeps its largest heap until it
    exits.  Nothing happens off glibc (macOS, musl), where it is False.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def _numpy_kernels() -> SimpleNamespace:
    """NumPy's fast paths, once the allocator keeps freed memory (:func:`keep_freed_memory`, done once)."""
    keep_freed_memory()
    return _NUMPY


@cache
def _cupy_kernels() -> SimpleNamespace:
    """The reference with CuPy's fused kernels in place (imported at the first CuPy array)."""
    from . import fastpath_cupy as fused

    replaced = (
        "maxpool2d_forward",
        "maxpool2d_backward",
        "relu_backward",
        "dropout_forward",
        "cross_entropy",
        "batchnorm_forward",
        "batchnorm_backward",
    )
    return SimpleNamespace(
        **{
            **_public(F),
            **{name: getattr(fused, name) for name in replaced},
            "conv2d_forward": partial(F.conv2d_forward, im2col=fused.im2col),
            "conv2d_backward": partial(F.conv2d_backward, input_gradient=fused.input_gradient),
        }
    )


@cache
def _jax_kernels() -> SimpleNamespace:
    """The reference with XLA's convolutions in place (imported at the first JAX array)."""
    from . import fastpath_jax

    return SimpleNamespace(
        **{**_public(F), "conv2d_forward": fastpath_jax.conv2d_forward, "conv2d_backward": fastpath_jax.conv2d_backward}
    )


# XPCNN_FASTPATH=0 turns every fast path off: the reference runs on every backend (for measuring what they gain).
ENABLED = os.environ.get("XPCNN_FASTPATH", "1") != "0"


def optimizer_kernels(param):
    """CuPy's fused optimiser updates (``sgd_update_in_place``, ``adam_update_in_place``) for a CuPy flat buffer.

    None elsewhere, or with fast paths off: the optimiser then runs its own Array API update.
    """
    if not ENABLED or not is_cupy_array(param):
        return None
    from . import fastpath_cupy

    return fastpath_cupy


def compiler_options(device) -> dict:
    """XLA options for JAX's compiled steps on ``device`` (see :func:`xpcnn.ops.fastpath_jax.compiler_options`).

    Empty with fast paths off: XLA's defaults.
    """
    if not ENABLED:
        return {}
    from . import fastpath_jax

    return fastpath_jax.compiler_options(device)


def kernels(x):
    """The namespace of layer math for arrays like ``x``: NumPy's, CuPy's or JAX's fast paths, or the reference."""
    if not ENABLED:
        return F
    if isinstance(x, np.ndarray):
        return _numpy_kernels()
    if is_cupy_array(x):
        return _cupy_kernels()
    if is_jax_array(x):
        return _jax_kernels()
    return F
