"""Stateless layer math on the Array API standard: the reference path.

Every function takes arrays and gets ``xp`` from them, so the same code runs on
NumPy, CuPy, PyTorch, JAX, array-api-strict or any other conforming library.
Only arrays created here are ever updated: through :func:`_add_into` (in place
where the backend's arrays are writeable, ``array_api_extra.at`` where they are
not) and with in-place operators such as ``+=``, which rebind on immutable
arrays.  :mod:`xpcnn.fastpath` replaces a few of these functions on NumPy.

Notation:
    N batch, C input channels, H, W input height and width,
    O output channels, KH, KW kernel size, SH, SW stride, PH, PW padding,
    OH, OW output height and width, K number of classes.

Layout.  Arguments and results are NCHW, as in PyTorch.  Convolution builds
its patches channels-last, (N, OH, OW, KH*KW*C), so that forward and backward
are each one large 2-D matrix product; its output is an NCHW *view* of NHWC
data, and the next convolution's ``permute_dims`` back to NHWC is then free.
"""

from __future__ import annotations

import array_api_extra as xpx
from array_api_compat import array_namespace, device, is_writeable_array


def _add_into(x, index, values):
    """``x[index] += values`` on an array this module created; returns the updated array.

    In place when ``x`` is writeable (NumPy, CuPy, array-api-strict, torch);
    through ``array_api_extra.at``, which is functional, on immutable arrays
    (JAX).  ``at`` would work everywhere, but on mutable arrays it runs
    ``x[index] = x[index] + values``: a temporary and a second pass.
    """
    if is_writeable_array(x):
        x[index] += values
        return x
    return xpx.at(x)[index].add(values)


def _column_sum(matrix):
    """Sum of each column of a (rows, C) matrix, as a matrix-vector product.

    On NumPy this runs in BLAS on every core, several times faster than
    ``xp.sum(matrix, axis=0)``.
    """
    xp = array_namespace(matrix)
    return xp.ones(matrix.shape[0], dtype=matrix.dtype, device=device(matrix)) @ matrix


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Length of a convolution or pooling output along one spatial axis."""
    return (size + 2 * padding - kernel) // stride + 1


def _window(start: int, count: int, step: int) -> slice:
    """The slice that picks ``count`` positions ``start, start+step, ...``."""
    return slice(start, start + step * (count - 1) + 1, step)


def im2col(x, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]):
    """Patches of ``x`` (N, C, H, W) as a matrix (N*OH*OW, KH*KW*C).

    Row ``(n, oh, ow)`` holds the receptive field of output pixel ``(oh, ow)``
    of sample ``n``, ordered (kh, kw, c).  Built from KH*KW strided slices.
    """
    xp = array_namespace(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    x_nhwc = xp.permute_dims(x, (0, 2, 3, 1))
    if ph or pw:
        x_nhwc = xpx.pad(x_nhwc, ((0, 0), (ph, ph), (pw, pw), (0, 0)), xp=xp)
    patches = [x_nhwc[:, _window(i, oh, sh), _window(j, ow, sw), :] for i in range(kh) for j in range(kw)]
    cols = xp.stack(patches, axis=3)  # (N, OH, OW, KH*KW, C)
    return xp.reshape(cols, (n * oh * ow, kh * kw * c))


def col2im(cols, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: sum patch gradients (N*OH*OW, KH*KW*C) back into (N, C, H, W)."""
    xp = array_namespace(cols)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = xp.reshape(cols, (n, oh, ow, kh * kw, c))
    grad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=cols.dtype, device=device(cols))
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        grad = _add_into(grad, (slice(None), _window(i, oh, sh), _window(j, ow, sw), slice(None)), cols[:, :, :, k, :])
    grad = grad[:, ph : ph + h, pw : pw + w, :]
    return xp.permute_dims(grad, (0, 3, 1, 2))


def _weight_matrix(weight):
    """Conv weight (O, C, KH, KW) as (O, KH*KW*C), matching :func:`im2col`'s column order."""
    xp = array_namespace(weight)
    o, c, kh, kw = weight.shape
    return xp.reshape(xp.permute_dims(weight, (0, 2, 3, 1)), (o, kh * kw * c))


def conv2d_forward(x, weight, bias, stride=(1, 1), padding=(0, 0), *, im2col=im2col):
    """2-D cross-correlation.

    x (N, C, H, W), weight (O, C, KH, KW), bias (O,) or None.  Returns
    y (N, O, OH, OW) and the patch matrix that the backward pass needs.
    ``im2col`` lets a fast path supply its own patch builder.
    """
    xp = array_namespace(x, weight)
    n = x.shape[0]
    o, _, kh, kw = weight.shape
    cols = im2col(x, (kh, kw), stride, padding)
    y = cols @ xp.matrix_transpose(_weight_matrix(weight))  # (N*OH*OW, O), a new array
    if bias is not None:
        y += bias  # in place on the fresh product: no second (N*OH*OW, O) array
    oh, ow = output_size(x.shape[2], kh, stride[0], padding[0]), output_size(x.shape[3], kw, stride[1], padding[1])
    return xp.permute_dims(xp.reshape(y, (n, oh, ow, o)), (0, 3, 1, 2)), cols


def input_gradient(grad, weight, x_shape, stride, padding):
    """Gradient with respect to the convolution's input, from grad (N*OH*OW, O): col2im(grad @ W)."""
    kernel = tuple(weight.shape[2:])
    return col2im(grad @ _weight_matrix(weight), x_shape, kernel, stride, padding)


def conv2d_backward(
    grad_y, cols, weight, x_shape, stride=(1, 1), padding=(0, 0), input_grad=True, *, input_gradient=input_gradient
):
    """Gradients of :func:`conv2d_forward`.

    grad_y (N, O, OH, OW); cols from the forward pass.  Returns
    (grad_x (N, C, H, W) or None when ``input_grad`` is False, grad_weight, grad_bias).
    ``input_gradient`` lets a fast path supply its own grad_x computation.
    """
    xp = array_namespace(grad_y, weight)
    o, c, kh, kw = weight.shape
    g = xp.reshape(xp.permute_dims(grad_y, (0, 2, 3, 1)), (-1, o))  # (N*OH*OW, O)
    grad_w = xp.matrix_transpose(cols) @ g  # (KH*KW*C, O): faster than g.T @ cols for the usual shapes
    grad_w = xp.permute_dims(xp.reshape(grad_w, (kh, kw, c, o)), (3, 2, 0, 1))
    grad_b = _column_sum(g)
    grad_x = input_gradient(g, weight, x_shape, stride, padding) if input_grad else None
    return grad_x, grad_w, grad_b


def _pool_windows(x, kernel, stride):
    """The KH*KW strided views of ``x`` (N, C, H, W), each (N, C, OH, OW), in row-major order."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = output_size(x.shape[2], kh, sh), output_size(x.shape[3], kw, sw)
    return [x[:, :, _window(i, oh, sh), _window(j, ow, sw)] for i in range(kh) for j in range(kw)]


def maxpool2d_forward(x, kernel, stride, record: bool = True):
    """Max over KH x KW windows moved by (SH, SW): (N, C, H, W) -> (N, C, OH, OW).

    Returns y and the record of which window won each comparison, which
    :func:`maxpool2d_backward` needs (None with ``record=False``, for
    inference).  The maximum is found by a knockout tournament over the KH*KW
    window offsets in row-major order: at each match the later group must be
    strictly greater to win, so a tie goes to the first maximum (PyTorch's and
    Chainer's convention).
    """
    xp = array_namespace(x)
    windows = _pool_windows(x, kernel, stride)
    if not record:
        y = windows[0]
        for window in windows[1:]:
            y = xp.maximum(y, window)
        return y, None
    return _tournament(xp, windows)


def _tournament(xp, windows):
    """(max of ``windows``, record): record is None for one window, else (later_won, left record, right record)."""
    if len(windows) == 1:
        return windows[0], None
    middle = len(windows) // 2
    left, left_record = _tournament(xp, windows[:middle])
    right, right_record = _tournament(xp, windows[middle:])
    return xp.maximum(left, right), (right > left, left_record, right_record)


def _replay(grad, record, count):
    """Split ``grad`` among ``count`` windows along a tournament record: the winner of each match takes it all."""
    if record is None:
        return [grad]
    xp = array_namespace(grad)
    later_won, left_record, right_record = record
    middle = count // 2
    grad_right = grad * xp.astype(later_won, grad.dtype)
    grad_left = grad - grad_right
    return _replay(grad_left, left_record, middle) + _replay(grad_right, right_record, count - middle)


def maxpool2d_backward(grad_y, record, x_shape, kernel, stride):
    """Route ``grad_y`` (N, C, OH, OW) to the first maximum of each window; overlapping windows add up."""
    xp = array_namespace(grad_y)
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x_shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    grad = xp.permute_dims(xp.zeros((n, h, w, c), dtype=grad_y.dtype, device=device(grad_y)), (0, 3, 1, 2))
    for k, window_grad in enumerate(_replay(grad_y, record, kh * kw)):
        i, j = divmod(k, kw)
        grad = _add_into(grad, (slice(None), slice(None), _window(i, oh, sh), _window(j, ow, sw)), window_grad)
    return grad


def relu_backward(grad_y, y):
    """Gradient of max(x, 0) given its output ``y``: zero where y <= 0.

    A product with the mask rather than ``where``: NumPy runs ufuncs in memory
    order, so this stays fast on the NCHW views of channels-last data that
    convolutions produce, where ``where`` walks them against the grain.
    """
    xp = array_namespace(grad_y, y)
    return grad_y * xp.astype(y > 0, grad_y.dtype)


def linear_forward(x, weight, bias):
    """x (N, I) @ weight (O, I)^T + bias (O,) -> (N, O)."""
    xp = array_namespace(x, weight)
    y = x @ xp.matrix_transpose(weight)
    return y if bias is None else y + bias


def linear_backward(grad_y, x, weight, input_grad=True):
    """Gradients of :func:`linear_forward`: (grad_x or None, grad_weight, grad_bias)."""
    xp = array_namespace(grad_y, weight)
    grad_w = xp.matrix_transpose(grad_y) @ x
    grad_b = xp.sum(grad_y, axis=0)
    grad_x = grad_y @ weight if input_grad else None
    return grad_x, grad_w, grad_b


def log_softmax(logits, axis: int = -1):
    """Numerically stable log of the softmax along ``axis``."""
    xp = array_namespace(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis: int = -1):
    """Softmax along ``axis``."""
    xp = array_namespace(logits)
    return xp.exp(log_softmax(logits, axis=axis))


def one_hot(labels, num_classes: int, dtype):
    """Integer labels (N,) -> (N, num_classes) of ``dtype``, without scatter."""
    xp = array_namespace(labels)
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device(labels))
    return xp.astype(labels[:, None] == classes, dtype)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy of logits (N, K) against integer labels (N,).

    With ``label_smoothing`` e the target is (1 - e) * one_hot + e / K, as in
    PyTorch.  Returns (loss as a 0-d array, grad_logits (N, K)).
    """
    xp = array_namespace(logits, labels)
    n, k = logits.shape
    log_p = log_softmax(logits, axis=1)
    target = one_hot(labels, k, logits.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    loss = -xp.sum(log_p * target) / n
    return loss, (xp.exp(log_p) - target) / n


def _channel_matrix(x):
    """(N, C) or (N, C, H, W) as a (rows, C) matrix, channels-last; free for the NCHW views convolutions make."""
    xp = array_namespace(x)
    if x.ndim == 2:
        return x
    return xp.reshape(xp.permute_dims(x, (0, 2, 3, 1)), (-1, x.shape[1]))


def _from_channel_matrix(matrix, shape):
    """Inverse of :func:`_channel_matrix` for an array of ``shape``."""
    xp = array_namespace(matrix)
    if len(shape) == 2:
        return matrix
    n, c, h, w = shape
    return xp.permute_dims(xp.reshape(matrix, (n, h, w, c)), (0, 3, 1, 2))


def batchnorm_forward(x, weight, bias, eps: float):
    """Batch normalisation over every axis but 1 (channels), with batch statistics.

    x (N, C) or (N, C, H, W); weight, bias (C,).  Works on the channels-last
    (rows, C) matrix of ``x``, with column sums as matrix-vector products.
    Returns (y shaped like x, x - mean as a (rows, C) matrix, inv_std (C,),
    mean (C,), biased variance (C,)).
    """
    matrix = _channel_matrix(x)
    rows = matrix.shape[0]
    mean = _column_sum(matrix) / rows
    centred = matrix - mean
    var = _column_sum(centred * centred) / rows
    inv_std = 1.0 / array_namespace(x).sqrt(var + eps)
    y = centred * (weight * inv_std) + bias
    return _from_channel_matrix(y, tuple(x.shape)), centred, inv_std, mean, var


def batchnorm_backward(grad_y, centred, inv_std, weight):
    """Gradients of :func:`batchnorm_forward`: (grad_x shaped like grad_y, grad_weight, grad_bias).

    With x_hat = centred * inv_std and per-channel means over the rows:
    grad_x = weight * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)).
    """
    g = _channel_matrix(grad_y)
    rows = g.shape[0]
    grad_bias = _column_sum(g)
    grad_weight = _column_sum(g * centred) * inv_std
    grad_x = (g - grad_bias / rows - centred * (grad_weight * inv_std / rows)) * (weight * inv_std)
    return _from_channel_matrix(grad_x, tuple(grad_y.shape)), grad_weight, grad_bias


def batchnorm_inference(x, weight, bias, running_mean, running_var, eps: float):
    """Batch normalisation with stored statistics (evaluation mode)."""
    xp = array_namespace(x, weight)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = weight / xp.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    return x * xp.reshape(scale, shape) + xp.reshape(shift, shape)
