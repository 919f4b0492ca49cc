"""Stateless layer math on the Array API standard, every layer's forward and backward: the reference path.

Every function takes arrays and gets ``xp`` from them, so the same code runs on
NumPy, CuPy, PyTorch, JAX, array-api-strict or any other conforming library.
Only arrays created here are ever updated: through :func:`_add_into` (in place
where the backend's arrays are writeable, ``array_api_extra.at`` where they are
not) and with in-place operators such as ``+=``, which rebind on immutable
arrays.  :mod:`xpcnn.ops.fastpath` replaces a few of these functions on NumPy.

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

import itertools

import array_api_extra as xpx
from array_api_compat import device, is_writeable_array

from .backends.backend import namespace


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


_CONSTANTS: dict = {}


def _constant(like, name: tuple, make):
    """A constant for arrays like ``like`` (namespace, dtype, device), made once by ``make(xp, dtype, device)``.

    On a GPU each array creation is a kernel launch, so constants that every
    step needs (a ones vector, an ``arange``) are made once per shape and
    reused.  Only for writeable arrays: an immutable array (JAX) may be a
    tracer inside a compiled function, which must not outlive it.  Callers
    must never modify the result.
    """
    xp = namespace(like)
    if not is_writeable_array(like):
        return make(xp, like.dtype, device(like))
    key = (xp.__name__, str(device(like)), str(like.dtype), *name)
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = make(xp, like.dtype, device(like))
    return value


def constant(like, values):
    """A cached array of ``values`` (a number, or nested tuples of numbers), with ``like``'s namespace, dtype and
    device (see :func:`_constant`)."""
    return _constant(like, ("constant", values), lambda xp, dtype, dev: xp.asarray(values, dtype=dtype, device=dev))


def _column_sum(matrix):
    """Sum of each column of a (rows, C) matrix, as a product with a cached ones vector: one operation.

    On NumPy this runs in BLAS on every core, several times faster than
    ``xp.sum(matrix, axis=0)``.
    """
    rows = matrix.shape[0]
    ones = _constant(matrix, ("ones", rows), lambda xp, dtype, dev: xp.ones(rows, dtype=dtype, device=dev))
    return ones @ matrix


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Length of a convolution or pooling output along one spatial axis."""
    return (size + 2 * padding - kernel) // stride + 1


def _window(start: int, count: int, step: int) -> slice:
    """The slice that picks ``count`` positions ``start, start+step, ...``."""
    return slice(start, start + step * (count - 1) + 1, step)


def _patches(x_nhwc, kernel, stride, out_hw, offsets):
    """Patch matrix (N*OH*OW, C*KH*KW) of a channels-last array, columns ordered (c, kh, kw).

    Column (c, kh, kw) holds ``x_nhwc[n, offsets(kh) + oh*SH, offsets(kw) + ow*SW, c]``:
    the KH*KW strided slices are stacked on a new last axis, one operation.
    """
    xp = namespace(x_nhwc)
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    slices = [
        x_nhwc[:, _window(offsets[0](i), oh, sh), _window(offsets[1](j), ow, sw), :]
        for i in range(kh)
        for j in range(kw)
    ]
    return xp.reshape(xp.stack(slices, axis=-1), (n * oh * ow, c * kh * kw))


def _same(index: int) -> int:
    return index


def im2col(x, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]):
    """Patches of ``x`` (N, C, H, W) as a matrix (N*OH*OW, C*KH*KW).

    Row ``(n, oh, ow)`` holds the receptive field of output pixel ``(oh, ow)``
    of sample ``n``, ordered (c, kh, kw) like a flattened PyTorch weight
    (O, C, KH, KW): the weight is then a free reshape, and its gradient comes
    out contiguous in PyTorch's layout.
    """
    xp = namespace(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, w = x.shape[2], x.shape[3]
    out_hw = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    x_nhwc = xp.permute_dims(x, (0, 2, 3, 1))
    if ph or pw:
        x_nhwc = xpx.pad(x_nhwc, ((0, 0), (ph, ph), (pw, pw), (0, 0)), xp=xp)
    return _patches(x_nhwc, kernel, stride, out_hw, (_same, _same))


def col2im(cols, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: sum patch gradients (N*OH*OW, C*KH*KW) back into (N, C, H, W)."""
    xp = namespace(cols)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = xp.reshape(cols, (n, oh, ow, c, kh * kw))
    grad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=cols.dtype, device=device(cols))
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        grad = _add_into(grad, (slice(None), _window(i, oh, sh), _window(j, ow, sw), slice(None)), cols[..., k])
    grad = grad[:, ph : ph + h, pw : pw + w, :]
    return xp.permute_dims(grad, (0, 3, 1, 2))


def _weight_matrix(weight):
    """Conv weight (O, C, KH, KW) as (O, C*KH*KW), matching :func:`im2col`'s column order: a free reshape."""
    xp = namespace(weight)
    return xp.reshape(weight, (weight.shape[0], -1))


def _weight_gradient(grad, cols, weight_shape):
    """Weight gradient (O, C, KH, KW), contiguous, from grad (N*OH*OW, O) and :func:`im2col`'s patches."""
    xp = namespace(grad, cols)
    return xp.reshape(xp.matrix_transpose(grad) @ cols, weight_shape)


def conv2d_forward(x, weight, bias, stride=(1, 1), padding=(0, 0), *, im2col=im2col, weight_matrix=_weight_matrix):
    """2-D cross-correlation.

    x (N, C, H, W), weight (O, C, KH, KW), bias (O,) or None.  Returns
    y (N, O, OH, OW) and the patch matrix that the backward pass needs.
    ``im2col`` and ``weight_matrix`` let a fast path supply its own patch
    builder with the matching weight layout.
    """
    xp = namespace(x, weight)
    n = x.shape[0]
    o, _, kh, kw = weight.shape
    cols = im2col(x, (kh, kw), stride, padding)
    y = cols @ xp.matrix_transpose(weight_matrix(weight))  # (N*OH*OW, O), a new array
    if bias is not None:
        y += bias  # in place on the fresh product: no second (N*OH*OW, O) array
    oh, ow = output_size(x.shape[2], kh, stride[0], padding[0]), output_size(x.shape[3], kw, stride[1], padding[1])
    return xp.permute_dims(xp.reshape(y, (n, oh, ow, o)), (0, 3, 1, 2)), cols


def input_gradient(grad, weight, x_shape, stride, padding):
    """Gradient (N, C, H, W) with respect to the convolution's input, from grad (N*OH*OW, O).

    With stride 1 (and padding < kernel) this is a correlation of the
    zero-padded output gradient with the flipped kernel: one pad, one patch
    matrix, one product.  Otherwise ``col2im(grad @ W)``.
    """
    xp = namespace(grad, weight)
    n, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    (ph, pw) = padding
    if tuple(stride) != (1, 1) or ph >= kh or pw >= kw:
        return col2im(grad @ _weight_matrix(weight), x_shape, (kh, kw), stride, padding)
    oh, ow = output_size(h, kh, 1, ph), output_size(w, kw, 1, pw)
    g = xp.reshape(grad, (n, oh, ow, o))
    margin_h, margin_w = kh - 1 - ph, kw - 1 - pw  # so that the padded gradient is (N, H+KH-1, W+KW-1, O)
    if margin_h or margin_w:
        g = xpx.pad(g, ((0, 0), (margin_h, margin_h), (margin_w, margin_w), (0, 0)), xp=xp)
    flipped = (lambda i: kh - 1 - i, lambda j: kw - 1 - j)
    patches = _patches(g, (kh, kw), (1, 1), (h, w), flipped)  # (N*H*W, O*KH*KW), columns (o, kh, kw)
    # W[o, c, kh, kw] at row (o, kh, kw), column c: the one copy of the step's weight
    kernel_rows = xp.reshape(xp.permute_dims(weight, (0, 2, 3, 1)), (o * kh * kw, c))
    return xp.permute_dims(xp.reshape(patches @ kernel_rows, (n, h, w, c)), (0, 3, 1, 2))


def conv2d_backward(
    grad_y,
    cols,
    weight,
    x_shape,
    stride=(1, 1),
    padding=(0, 0),
    input_grad=True,
    bias_grad=True,
    *,
    input_gradient=input_gradient,
    weight_gradient=_weight_gradient,
):
    """Gradients of :func:`conv2d_forward`.

    grad_y (N, O, OH, OW); cols from the forward pass.  Returns
    (grad_x (N, C, H, W) or None when ``input_grad`` is False, grad_weight,
    grad_bias or None when ``bias_grad`` is False: a layer without a bias).
    ``input_gradient`` and ``weight_gradient`` let a fast path supply its own.
    """
    xp = namespace(grad_y, weight)
    g = xp.reshape(xp.permute_dims(grad_y, (0, 2, 3, 1)), (-1, weight.shape[0]))  # (N*OH*OW, O)
    grad_w = weight_gradient(g, cols, tuple(weight.shape))
    grad_b = _column_sum(g) if bias_grad else None
    grad_x = input_gradient(g, weight, x_shape, stride, padding) if input_grad else None
    return grad_x, grad_w, grad_b


def _tiles(x, kernel):
    """x (N, C, H, W) as channels-last tiles (N, OH, KH, OW, KW, C), dropping rows and columns no window covers.

    A view wherever the backend has views (splitting an axis needs no copy).
    """
    xp = namespace(x)
    (kh, kw), (n, c, h, w) = kernel, x.shape
    oh, ow = h // kh, w // kw
    x_nhwc = xp.permute_dims(x, (0, 2, 3, 1))[:, : oh * kh, : ow * kw, :]
    return xp.reshape(x_nhwc, (n, oh, kh, ow, kw, c))


def _pool_windows(x, kernel, stride):
    """The KH*KW strided views of ``x`` (N, C, H, W), each (N, C, OH, OW), in row-major order."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = output_size(x.shape[2], kh, sh), output_size(x.shape[3], kw, sw)
    return [x[:, :, _window(i, oh, sh), _window(j, ow, sw)] for i in range(kh) for j in range(kw)]


def maxpool2d_forward(x, kernel, stride, record: bool = True):
    """Max over KH x KW windows moved by (SH, SW): (N, C, H, W) -> (N, C, OH, OW).

    Returns y and the record of where each maximum was, which
    :func:`maxpool2d_backward` needs (None with ``record=False``, for
    inference).  A tie goes to the first maximum in row-major window order
    (PyTorch's convention).

    Tiling windows (stride == kernel, the common case): one copy puts each
    window on its own last axis, then ``max`` and ``argmax`` (which returns
    the first occurrence) are one operation each; the record is the window
    offset of each maximum, (N, OH, OW, C).  Overlapping or gapped windows: a
    knockout tournament over the KH*KW window offsets, where the later group
    must be strictly greater to win a match; the record is the tree of matches.
    """
    xp = namespace(x)
    (kh, kw) = kernel
    if tuple(stride) == tuple(kernel):
        tiles = _tiles(x, kernel)
        if not record:
            return xp.permute_dims(xp.max(tiles, axis=(2, 4)), (0, 3, 1, 2)), None
        n, oh, _, ow, _, c = tiles.shape
        windows = xp.reshape(xp.permute_dims(tiles, (0, 1, 3, 5, 2, 4)), (n, oh, ow, c, kh * kw))
        y = xp.max(windows, axis=-1)
        return xp.permute_dims(y, (0, 3, 1, 2)), xp.argmax(windows, axis=-1)
    windows = _pool_windows(x, kernel, stride)
    if not record:
        return _window_max(xp, windows), None
    return _tournament(xp, windows)


def _window_max(xp, windows):
    """Elementwise maximum of a list of same-shaped arrays."""
    y = windows[0]
    for window in windows[1:]:
        y = xp.maximum(y, window)
    return y


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
    xp = namespace(grad)
    later_won, left_record, right_record = record
    middle = count // 2
    grad_right = xp.where(later_won, grad, 0.0)
    grad_left = grad - grad_right
    return _replay(grad_left, left_record, middle) + _replay(grad_right, right_record, count - middle)


def _tiling_backward(grad_y, winners, x_shape, kernel):
    """:func:`maxpool2d_backward` for tiling windows: ``winners`` (N, OH, OW, C) holds each maximum's window offset.

    Compares the offsets with a cached (KH, KW) ``arange`` and picks the
    gradient where they match, both broadcast over the tiles (N, OH, KH, OW,
    KW, C), whose memory is already that of the channels-last input: two
    operations, and one more to pad rows and columns that no window covers.
    """
    xp = namespace(grad_y)
    (kh, kw), (n, c, h, w) = kernel, x_shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    offsets = _constant(
        winners,
        ("window offsets", kh, kw),
        lambda xp, dtype, dev: xp.reshape(xp.arange(kh * kw, dtype=dtype, device=dev), (1, 1, kh, 1, kw, 1)),
    )
    won = xp.reshape(winners, (n, oh, 1, ow, 1, c)) == offsets
    g = xp.reshape(xp.permute_dims(grad_y, (0, 2, 3, 1)), (n, oh, 1, ow, 1, c))
    grad = xp.reshape(xp.where(won, g, 0.0), (n, oh * kh, ow * kw, c))
    if oh * kh < h or ow * kw < w:
        grad = xpx.pad(grad, ((0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0)), xp=xp)
    return xp.permute_dims(grad, (0, 3, 1, 2))


def maxpool2d_backward(grad_y, record, x_shape, kernel, stride):
    """Route ``grad_y`` (N, C, OH, OW) to the first maximum of each window; overlapping windows add up."""
    if tuple(stride) == tuple(kernel):
        return _tiling_backward(grad_y, record, x_shape, kernel)
    xp = namespace(grad_y)
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x_shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    grad = xp.permute_dims(xp.zeros((n, h, w, c), dtype=grad_y.dtype, device=device(grad_y)), (0, 3, 1, 2))
    for k, window_grad in enumerate(_replay(grad_y, record, kh * kw)):
        i, j = divmod(k, kw)
        grad = _add_into(grad, (slice(None), slice(None), _window(i, oh, sh), _window(j, ow, sw)), window_grad)
    return grad


def global_avgpool2d_forward(x):
    """Mean of each channel over H and W: (N, C, H, W) -> (N, C)."""
    return namespace(x).mean(x, axis=(2, 3))


def global_avgpool2d_backward(grad_y, x_shape):
    """Gradient of :func:`global_avgpool2d_forward`: ``grad_y`` (N, C) / (H*W) at every pixel, (N, C, H, W).

    A broadcast (a view where the backend has views), channels-last as a convolution's output is.
    """
    xp = namespace(grad_y)
    n, c, h, w = x_shape
    return xp.permute_dims(xp.broadcast_to(xp.reshape(grad_y / (h * w), (n, 1, 1, c)), (n, h, w, c)), (0, 3, 1, 2))


def relu_backward(grad_y, y):
    """Gradient of max(x, 0) given its output ``y``: ``grad_y`` where y > 0, else zero."""
    xp = namespace(grad_y, y)
    return xp.where(y > 0, grad_y, 0.0)


def dropout_forward(x, uniform, p: float):
    """Inverted dropout: x * mask with mask = 1 / (1 - p) where ``uniform`` >= p, else 0.

    ``uniform`` holds draws in [0, 1) shaped like x.  Returns (y, mask); the
    backward pass is grad * mask.
    """
    xp = namespace(x, uniform)
    mask = xp.where(uniform >= p, constant(x, 1.0 / (1.0 - p)), 0.0)
    return x * mask, mask


def linear_forward(x, weight, bias):
    """x (N, I) @ weight (O, I)^T + bias (O,) -> (N, O)."""
    xp = namespace(x, weight)
    y = x @ xp.matrix_transpose(weight)
    return y if bias is None else y + bias


def linear_backward(grad_y, x, weight, input_grad=True):
    """Gradients of :func:`linear_forward`: (grad_x or None, grad_weight, grad_bias)."""
    xp = namespace(grad_y, weight)
    grad_w = xp.matrix_transpose(grad_y) @ x
    grad_b = _column_sum(grad_y)
    grad_x = grad_y @ weight if input_grad else None
    return grad_x, grad_w, grad_b


def log_softmax(logits, axis: int = -1):
    """Numerically stable log of the softmax along ``axis``."""
    xp = namespace(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis: int = -1):
    """Softmax along ``axis``."""
    xp = namespace(logits)
    return xp.exp(log_softmax(logits, axis=axis))


def _classes(labels, num_classes: int):
    """A cached ``arange(num_classes)`` of the labels' dtype, as a row (1, num_classes)."""
    return _constant(
        labels,
        ("classes", num_classes),
        lambda xp, dtype, dev: xp.reshape(xp.arange(num_classes, dtype=dtype, device=dev), (1, num_classes)),
    )


def _target_rows(like, n: int, k: int, label_smoothing: float):
    """The cached (K, K) table whose row c is the target for label c in a batch of ``n``, divided by ``n``."""

    def make(xp, dtype, dev):
        off = label_smoothing / k / n
        on = xp.asarray((1.0 - label_smoothing) / n + off, dtype=dtype, device=dev)
        return xp.where(xp.eye(k, dtype=dtype, device=dev) == 1, on, off)

    return _constant(like, ("target rows", n, k, label_smoothing), make)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy of logits (N, K), N >= 1, against integer labels (N,).

    With ``label_smoothing`` e the target is (1 - e) * one_hot + e / K, as in
    PyTorch.  Returns (loss as a 0-d array, grad_logits (N, K)).

    The target is built already divided by N, so that the mean is one dot
    product of the target with -log_softmax, and the gradient is
    softmax / N - target.  Its rows are gathered from a cached (K, K) table
    (one operation, where comparing the labels with the classes takes two).
    Labels outside [0, K) are not checked here (:class:`xpcnn.nn.CrossEntropyLoss`
    checks them unless told not to): on NumPy and torch a label >= K is an error
    and a negative one counts from the end (-1 is class K-1), elsewhere undefined.
    """
    xp = namespace(logits, labels)
    n, k = logits.shape
    if labels.dtype not in (xp.int32, xp.int64):  # torch takes uint8 indices as a mask and refuses int8, int16
        labels = xp.astype(labels, xp.int32)  # not int64: JAX (without x64) would warn and truncate it anyway
    rows = _target_rows(logits, n, k, label_smoothing)
    target = rows[labels[:, None], _classes(labels, k)]  # (N, K), rows sum to 1 / N
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=1, keepdims=True)
    neg_log_p = xp.log(total) - shifted
    loss = xp.reshape(target, (-1,)) @ xp.reshape(neg_log_p, (-1,))
    return loss, exp / (total * n) - target


def _channel_matrix(x):
    """(N, C) or (N, C, H, W) as a (rows, C) matrix, channels-last; free for the NCHW views convolutions make."""
    xp = namespace(x)
    if x.ndim == 2:
        return x
    return xp.reshape(xp.permute_dims(x, (0, 2, 3, 1)), (-1, x.shape[1]))


def _from_channel_matrix(matrix, shape):
    """Inverse of :func:`_channel_matrix` for an array of ``shape``."""
    xp = namespace(matrix)
    if len(shape) == 2:
        return matrix
    n, c, h, w = shape
    return xp.permute_dims(xp.reshape(matrix, (n, h, w, c)), (0, 3, 1, 2))


def batchnorm_forward(x, weight, bias, eps: float):
    """Batch normalisation over every axis but 1 (channels), with batch statistics.

    x (N, C) or (N, C, H, W); weight, bias (C,).  Works on the channels-last
    (rows, C) matrix of ``x``.  Returns (y shaped like x, the normalised
    x_hat as a (rows, C) matrix, inv_std (C,), mean (C,), biased variance (C,)).
    """
    xp = namespace(x)
    matrix = _channel_matrix(x)
    # Rows mostly of one value (a blank background) added one at a time in float32 (NumPy's column sums, XLA's CPU
    # loops) are ~3e-5 off, a bias training compounds: each mean is corrected by the mean of its deviations.
    rough = xp.mean(matrix, axis=0)
    mean = rough + xp.mean(matrix - rough, axis=0)
    centred = matrix - mean
    squares = centred * centred
    rough = xp.mean(squares, axis=0)
    var = rough + xp.mean(squares - rough, axis=0)
    inv_std = (var + eps) ** -0.5
    x_hat = centred * inv_std
    y = x_hat * weight + bias
    return _from_channel_matrix(y, tuple(x.shape)), x_hat, inv_std, mean, var


def _column_dot(a, b):
    """sum(a * b) over the rows of two (rows, C) matrices, as the diagonal of one (C, C) product.

    One operation where a product and a column sum take two, for C times the
    multiply-adds: a few microseconds on a GPU at these widths.
    """
    xp = namespace(a, b)
    return xp.linalg.diagonal(xp.matrix_transpose(a) @ b)


def batchnorm_backward(grad_y, x_hat, inv_std, weight, *, column_dot=_column_dot):
    """Gradients of :func:`batchnorm_forward`: (grad_x shaped like grad_y, grad_weight, grad_bias).

    With per-channel means over the rows:
    grad_x = weight * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)).
    ``column_dot`` lets a fast path supply its own per-channel sum of g * x_hat.
    """
    g = _channel_matrix(grad_y)
    rows = g.shape[0]
    grad_bias = _column_sum(g)
    grad_weight = column_dot(g, x_hat)
    grad_x = (g - (x_hat * grad_weight + grad_bias) / rows) * (weight * inv_std)
    return _from_channel_matrix(grad_x, tuple(grad_y.shape)), grad_weight, grad_bias


def sync_batchnorm_forward(x, weight, bias, eps: float, total, ranks: int):
    """:func:`batchnorm_forward` with the statistics of the global batch: the rows of all ``ranks`` together.

    Every rank holds as many rows as this one.  ``total`` sums a 1-d array over the ranks (an all-reduce,
    e.g. ``Communicator.all_reduce_sum``; its result is used, so it may be functional); it is called
    twice, for the per-channel sums and for the squared deviations from the global mean (two passes: as
    exact as one process's variance).  Returns (y, x_hat (rows, C), inv_std (C,), mean (C,), biased
    variance (C,), the global row count).
    """
    matrix = _channel_matrix(x)
    count = int(matrix.shape[0]) * ranks
    mean = total(_column_sum(matrix)) / count
    centred = matrix - mean
    var = total(_column_sum(centred * centred)) / count
    inv_std = (var + eps) ** -0.5
    x_hat = centred * inv_std
    y = x_hat * weight + bias
    return _from_channel_matrix(y, tuple(x.shape)), x_hat, inv_std, mean, var, count


def sync_batchnorm_backward(grad_y, x_hat, inv_std, weight, count: int, total):
    """Gradients of :func:`sync_batchnorm_forward` for this rank's rows: (grad_x, grad_weight, grad_bias).

    ``grad_y`` is the gradient of this rank's loss; the means over the rows in
    :func:`batchnorm_backward` become means over all ``count`` rows of every rank (one ``total`` of
    the per-channel sums).  grad_weight and grad_bias are this rank's sums: averaged with the other
    gradients, they are the global batch's.
    """
    xp = namespace(grad_y)
    g = _channel_matrix(grad_y)
    grad_bias = _column_sum(g)
    grad_weight = _column_dot(g, x_hat)
    channels = int(grad_bias.shape[0])
    summed = total(xp.concat([grad_bias, grad_weight]))
    grad_x = (g - (x_hat * summed[channels:] + summed[:channels]) / count) * (weight * inv_std)
    return _from_channel_matrix(grad_x, tuple(grad_y.shape)), grad_weight, grad_bias


def moving_averages(averages: list, values: list, weights: tuple) -> list:
    """``(1 - m) * average + m * s * value`` for each pair, all in one update: new 1-d arrays.

    ``averages`` and ``values``: matching lists of 1-d arrays; ``weights``: (m, s) per pair.
    One concatenation of everything, one product with a cached (2, total) array of the
    coefficients, one sum of its two rows; the results are slices of that sum (views where
    the backend has them).
    """
    xp = namespace(*averages, *values)
    sizes = tuple(int(a.shape[0]) for a in averages)
    stacked = xp.reshape(xp.concat([*averages, *values]), (2, -1))

    def make(xp, dtype, dev):
        keep = [1.0 - m for (m, _), size in zip(weights, sizes, strict=True) for _ in range(size)]
        take = [m * s for (m, s), size in zip(weights, sizes, strict=True) for _ in range(size)]
        return xp.asarray([keep, take], dtype=dtype, device=dev)

    combined = xp.sum(stacked * _constant(stacked, ("moving averages", sizes, weights), make), axis=0)
    return [combined[stop - size : stop] for size, stop in zip(sizes, itertools.accumulate(sizes), strict=True)]


def batchnorm_inference(x, weight, bias, running_mean, running_var, eps: float):
    """Batch normalisation with stored statistics (evaluation mode)."""
    xp = namespace(x, weight)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = weight / xp.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    return x * xp.reshape(scale, shape) + xp.reshape(shift, shape)
