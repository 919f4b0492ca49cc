"""CuPy's fused kernels behind the fast-path seam, each one's CUDA source beside its launcher: one kernel
where the Array API spells several.

On a GPU a small network's training step is bound by kernel launches (each
costs ~10 us of Python and driver time), not by arithmetic.  Each function
here gives the same result as the reference code it replaces, in one launch:
an :mod:`xpcnn.functional` function, or for the two optimiser updates an
optimiser's update rule in :mod:`xpcnn.optim` (tests compare them on the GPU,
ties included):

* the convolution's patch matrix (a pad and a stack of KH*KW slices: up to
  11 launches, CuPy copying each stacked slice on its own), forward and for
  the input gradient with stride 1;
* tiling max-pool forward (copy, max, argmax: 3 launches) and backward
  (compare, where, pad: 2-3 launches), reading the input through its strides;
* the ReLU gradient (compare, where: 2 launches);
* dropout's mask and product (compare, where, multiply: 3 launches);
* softmax cross-entropy with its gradient (12 launches), one block of threads
  that also sums the loss;
* batch normalisation forward (8 launches) and backward (9), one block of
  threads per channel;
* the SGD and Adam updates over the optimiser's flat buffers (about 8 and 13
  launches).

Imported only when a CuPy array is seen; kernels compile on first use and are
cached on disk by CuPy.
"""

from __future__ import annotations

import math

import cupy
import numpy as np

from .. import functional as F

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

_pool_forward = cupy.ElementwiseKernel(
    "raw T x, int32 kh, int32 kw, int32 oh_size, int32 ow_size, int32 c_size",
    "T y, int32 winner",
    """
    const int c = i % c_size;
    ptrdiff_t rest = i / c_size;
    const int ow = rest % ow_size;
    rest /= ow_size;
    const int oh = rest % oh_size;
    const ptrdiff_t n = rest / oh_size;
    ptrdiff_t at[4] = {n, c, (ptrdiff_t)oh * kh, (ptrdiff_t)ow * kw};
    T best = x[at];
    int best_offset = 0;
    for (int a = 0; a < kh; ++a) {
        for (int b = 0; b < kw; ++b) {
            at[2] = (ptrdiff_t)oh * kh + a;
            at[3] = (ptrdiff_t)ow * kw + b;
            const T value = x[at];
            // strictly greater: a tie goes to the first maximum; a NaN wins and stays
            if (!isnan(best) && (value > best || isnan(value))) {
                best = value;
                best_offset = a * kw + b;
            }
        }
    }
    y = best;
    winner = best_offset;
    """,
    "xpcnn_maxpool_forward",
)

_pool_backward = cupy.ElementwiseKernel(
    "raw T grad_y, raw int32 winner, int32 kh, int32 kw, int32 oh_size, int32 ow_size, int32 h_size, int32 w_size, "
    "int32 c_size",
    "T grad",
    """
    const int c = i % c_size;
    ptrdiff_t rest = i / c_size;
    const int w = rest % w_size;
    rest /= w_size;
    const int h = rest % h_size;
    const ptrdiff_t n = rest / h_size;
    const int oh = h / kh, ow = w / kw;
    T value = 0;
    if (oh < oh_size && ow < ow_size) {
        const ptrdiff_t tile = ((n * oh_size + oh) * ow_size + ow) * c_size + c;
        if (winner[tile] == (h - oh * kh) * kw + (w - ow * kw)) {
            const ptrdiff_t at[4] = {n, c, oh, ow};
            value = grad_y[at];
        }
    }
    grad = value;
    """,
    "xpcnn_maxpool_backward",
)

_im2col = cupy.ElementwiseKernel(
    "raw T x, int32 c_size, int32 h_size, int32 w_size, int32 kh, int32 kw, int32 sh, int32 sw, int32 ph, int32 pw, "
    "int32 oh_size, int32 ow_size, bool flip",
    "T col",
    """
    // col is (N*OH*OW, C*KH*KW), columns (c, kh, kw); x is (N, C, H, W) with any strides, zero outside.
    const int window = kh * kw;
    const int column = i % (c_size * window);
    const ptrdiff_t row = i / (c_size * window);
    const int c = column / window;
    int a = (column % window) / kw, b = column % kw;
    if (flip) {
        a = kh - 1 - a;
        b = kw - 1 - b;
    }
    const int ow = row % ow_size;
    const int oh = (row / ow_size) % oh_size;
    const ptrdiff_t n = row / ((ptrdiff_t)ow_size * oh_size);
    const int h = oh * sh + a - ph, w = ow * sw + b - pw;
    T value = 0;
    if (h >= 0 && h < h_size && w >= 0 && w < w_size) {
        const ptrdiff_t at[4] = {n, c, h, w};
        value = x[at];
    }
    col = value;
    """,
    "xpcnn_im2col",
)

_relu_backward = cupy.ElementwiseKernel(
    "T grad_y, T y", "T grad", "grad = y > 0 ? grad_y : (T)0", "xpcnn_relu_backward"
)

_dropout = cupy.ElementwiseKernel(
    "T x, T uniform, T p, T scale",
    "T y, T mask",
    "mask = uniform >= p ? scale : (T)0; y = x * mask",
    "xpcnn_dropout",
)

_CROSS_ENTROPY_SOURCE = r"""
template <typename T>
__global__ void cross_entropy(const T* logits, const long long* labels, const int n, const int k,
                              const T on, const T off, T* grad, T* loss) {
    // One block: each thread takes rows threadIdx.x, threadIdx.x + blockDim.x, ...; logits and grad are
    // C-contiguous (n, k).  The loss is the block's sum of sum_j target_j * (log(sum exp) - shifted_j),
    // the target already divided by n.
    __shared__ double partial[256];
    double own = 0.0;
    for (int row = threadIdx.x; row < n; row += blockDim.x) {
        const T* z = logits + (ptrdiff_t)row * k;
        T* d = grad + (ptrdiff_t)row * k;
        T top = z[0];
        for (int j = 1; j < k; ++j) {
            if (z[j] > top || isnan(z[j])) top = z[j];
        }
        T total = 0;
        for (int j = 0; j < k; ++j) total += exp(z[j] - top);
        const T log_total = log(total);
        const T scale = (T)1 / (total * (T)n);
        const long long label = labels[row];
        for (int j = 0; j < k; ++j) {
            const T shifted = z[j] - top;
            const T target = j == label ? on : off;
            own += (double)(target * (log_total - shifted));
            d[j] = exp(shifted) * scale - target;
        }
    }
    partial[threadIdx.x] = own;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (T)partial[0];
}
"""
_CROSS_ENTROPY_THREADS = 256
_cross_entropy_module = cupy.RawModule(
    code=_CROSS_ENTROPY_SOURCE, name_expressions=["cross_entropy<float>", "cross_entropy<double>"]
)
_CROSS_ENTROPY_NAMES = {np.dtype(np.float32): "cross_entropy<float>", np.dtype(np.float64): "cross_entropy<double>"}

_BATCHNORM_SOURCE = r"""
__device__ double block_sum(double value, double* shared) {
    // The sum over the block (blockDim.x a power of two); every thread gets it.
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();  // before shared is written again
    return total;
}

// Block c normalises channel c of the C-contiguous (rows, channels) matrix x: two passes for the mean and
// the biased variance (accumulated in double), a third writes x_hat and y = x_hat * weight + bias.
template <typename T>
__global__ void batchnorm_forward(const T* x, const T* weight, const T* bias, const long long rows,
                                  const int channels, const double eps, T* y, T* x_hat, T* inv_std_out,
                                  T* mean_out, T* var_out) {
    __shared__ double shared[256];
    const int c = blockIdx.x;
    double sum = 0.0;
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) sum += (double)x[r * channels + c];
    const double mean = block_sum(sum, shared) / (double)rows;
    double squares = 0.0;
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
        const double d = (double)x[r * channels + c] - mean;
        squares += d * d;
    }
    const double var = block_sum(squares, shared) / (double)rows;
    const T inv_std = (T)(1.0 / sqrt(var + eps));
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
        const long long at = r * channels + c;
        const T normalised = (x[at] - (T)mean) * inv_std;
        x_hat[at] = normalised;
        y[at] = normalised * weight[c] + bias[c];
    }
    if (threadIdx.x == 0) {
        inv_std_out[c] = inv_std;
        mean_out[c] = (T)mean;
        var_out[c] = (T)var;
    }
}

// Block c: the sums of g and g * x_hat over the rows of channel c, then grad_x.
template <typename T>
__global__ void batchnorm_backward(const T* g, const T* x_hat, const T* weight, const T* inv_std,
                                   const long long rows, const int channels, T* grad_x, T* grad_weight,
                                   T* grad_bias) {
    __shared__ double shared[256];
    const int c = blockIdx.x;
    double sum_g = 0.0, sum_gx = 0.0;
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
        const long long at = r * channels + c;
        sum_g += (double)g[at];
        sum_gx += (double)g[at] * (double)x_hat[at];
    }
    const double gb = block_sum(sum_g, shared);
    const double gw = block_sum(sum_gx, shared);
    const T scale = weight[c] * inv_std[c];
    for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
        const long long at = r * channels + c;
        grad_x[at] = (g[at] - (x_hat[at] * (T)gw + (T)gb) / (T)rows) * scale;
    }
    if (threadIdx.x == 0) {
        grad_weight[c] = (T)gw;
        grad_bias[c] = (T)gb;
    }
}
"""
_BATCHNORM_THREADS = 256
_batchnorm_module = cupy.RawModule(
    code=_BATCHNORM_SOURCE,
    name_expressions=[f"batchnorm_{p}<{t}>" for p in ("forward", "backward") for t in ("float", "double")],
)
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_sgd_momentum = cupy.ElementwiseKernel(
    "T grad, T lr, T momentum, T weight_decay, bool nesterov, bool first",
    "T param, T velocity",
    """
    const T g = grad + weight_decay * param;
    const T v = first ? g : momentum * velocity + g;
    velocity = v;
    param -= lr * (nesterov ? g + momentum * v : v);
    """,
    "xpcnn_sgd_momentum",
)

_sgd_plain = cupy.ElementwiseKernel(
    "T grad, T lr, T weight_decay", "T param", "param -= lr * (grad + weight_decay * param)", "xpcnn_sgd"
)

_adam = cupy.ElementwiseKernel(
    "T grad, T lr, T beta1, T beta2, T eps, T step_size, T denom_scale, T weight_decay, bool decoupled",
    "T param, T exp_avg, T exp_avg_sq",
    """
    T p = param;
    T g = grad;
    if (decoupled) p *= (T)1 - lr * weight_decay;
    else g += weight_decay * p;
    const T m = beta1 * exp_avg + ((T)1 - beta1) * g;
    const T v = beta2 * exp_avg_sq + ((T)1 - beta2) * g * g;
    exp_avg = m;
    exp_avg_sq = v;
    param = p - step_size * m / (sqrt(v) * denom_scale + eps);
    """,
    "xpcnn_adam",
)


def maxpool2d_forward(x, kernel, stride, record: bool = True):
    """:func:`xpcnn.functional.maxpool2d_forward`; tiling windows in one kernel, the record (N, OH, OW, C) int32."""
    if tuple(stride) != tuple(kernel) or x.dtype not in _FLOATS:
        return F.maxpool2d_forward(x, kernel, stride, record)
    (kh, kw), (n, c, h, w) = kernel, x.shape
    oh, ow = h // kh, w // kw
    y = cupy.empty((n, oh, ow, c), x.dtype)  # channels-last memory, as the reference's
    winner = cupy.empty((n, oh, ow, c), np.int32)
    _pool_forward(x, kh, kw, oh, ow, c, y, winner)
    return y.transpose(0, 3, 1, 2), (winner if record else None)


def maxpool2d_backward(grad_y, record, x_shape, kernel, stride):
    """:func:`xpcnn.functional.maxpool2d_backward`; tiling windows in one kernel, from this module's record."""
    if tuple(stride) != tuple(kernel) or grad_y.dtype not in _FLOATS:
        return F.maxpool2d_backward(grad_y, record, x_shape, kernel, stride)
    (kh, kw), (n, c, h, w) = kernel, x_shape
    grad = cupy.empty((n, h, w, c), grad_y.dtype)
    _pool_backward(grad_y, record, kh, kw, grad_y.shape[2], grad_y.shape[3], h, w, c, grad)
    return grad.transpose(0, 3, 1, 2)


def im2col(x, kernel, stride, padding):
    """:func:`xpcnn.functional.im2col` in one kernel (the reference pads, then stacks KH*KW slices)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = F.output_size(h, kh, sh, ph), F.output_size(w, kw, sw, pw)
    cols = cupy.empty((n * oh * ow, c * kh * kw), x.dtype)
    _im2col(x, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, False, cols)
    return cols


def input_gradient(grad, weight, x_shape, stride, padding):
    """:func:`xpcnn.functional.input_gradient`: for stride 1 the flipped-kernel patches of grad in one kernel.

    The zero padding the reference adds to the output gradient is the kernel's bounds check.
    """
    if tuple(stride) != (1, 1):
        return F.input_gradient(grad, weight, x_shape, stride, padding)
    (n, c, h, w), (o, _, kh, kw), (ph, pw) = x_shape, weight.shape, padding
    oh, ow = F.output_size(h, kh, 1, ph), F.output_size(w, kw, 1, pw)
    g = grad.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)  # (N, O, OH, OW), a view
    patches = cupy.empty((n * h * w, o * kh * kw), grad.dtype)
    _im2col(g, o, oh, ow, kh, kw, 1, 1, kh - 1 - ph, kw - 1 - pw, h, w, True, patches)
    kernel_rows = weight.transpose(0, 2, 3, 1).reshape(o * kh * kw, c)
    return (patches @ kernel_rows).reshape(n, h, w, c).transpose(0, 3, 1, 2)


def relu_backward(grad_y, y):
    """:func:`xpcnn.functional.relu_backward` in one kernel, keeping ``y``'s memory layout."""
    return _relu_backward(grad_y, y, cupy.empty_like(y))


def dropout_forward(x, uniform, p: float):
    """:func:`xpcnn.functional.dropout_forward` in one kernel (after the uniform draw)."""
    scale = 1.0 / (1.0 - p)
    return _dropout(x, uniform, p, scale, cupy.empty_like(x), cupy.empty_like(x))


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """:func:`xpcnn.functional.cross_entropy` in one kernel for int64 labels and float32/64 logits (N, K)."""
    n, k = logits.shape
    if logits.dtype not in _FLOATS or labels.dtype != np.int64 or n == 0 or k == 0:
        return F.cross_entropy(logits, labels, label_smoothing)
    logits, labels = cupy.ascontiguousarray(logits), cupy.ascontiguousarray(labels)
    off = label_smoothing / k / n
    on = (1.0 - label_smoothing) / n + off
    grad = cupy.empty((n, k), logits.dtype)
    loss = cupy.empty((), logits.dtype)
    kernel = _cross_entropy_module.get_function(_CROSS_ENTROPY_NAMES[logits.dtype])
    real = logits.dtype.type
    kernel((1,), (_CROSS_ENTROPY_THREADS,), (logits, labels, np.int32(n), np.int32(k), real(on), real(off), grad, loss))
    return loss, grad


def batchnorm_forward(x, weight, bias, eps: float):
    """:func:`xpcnn.functional.batchnorm_forward` in one kernel, one block per channel.

    For channels-last memory (what convolutions and pooling make, and (N, C)
    matrices); the reference otherwise.
    """
    matrix = F._channel_matrix(x)
    if x.dtype not in _FLOATS or not matrix.flags.c_contiguous or matrix.shape[0] == 0:
        return F.batchnorm_forward(x, weight, bias, eps)
    rows, channels = matrix.shape
    y, x_hat = cupy.empty_like(matrix), cupy.empty_like(matrix)
    inv_std, mean, var = (cupy.empty(channels, x.dtype) for _ in range(3))
    kernel = _batchnorm_module.get_function(f"batchnorm_forward<{_CTYPES[x.dtype]}>")
    weight, bias = cupy.ascontiguousarray(weight), cupy.ascontiguousarray(bias)
    arguments = (
        matrix,
        weight,
        bias,
        np.int64(rows),
        np.int32(channels),
        np.float64(eps),
        y,
        x_hat,
        inv_std,
        mean,
        var,
    )
    kernel((channels,), (_BATCHNORM_THREADS,), arguments)
    return F._from_channel_matrix(y, tuple(x.shape)), x_hat, inv_std, mean, var


def batchnorm_backward(grad_y, x_hat, inv_std, weight):
    """:func:`xpcnn.functional.batchnorm_backward` in one kernel, one block per channel."""
    g = F._channel_matrix(grad_y)
    if grad_y.dtype not in _FLOATS or not g.flags.c_contiguous or not x_hat.flags.c_contiguous:
        return F.batchnorm_backward(grad_y, x_hat, inv_std, weight)
    rows, channels = g.shape
    grad_x = cupy.empty_like(g)
    grad_weight, grad_bias = cupy.empty(channels, g.dtype), cupy.empty(channels, g.dtype)
    kernel = _batchnorm_module.get_function(f"batchnorm_backward<{_CTYPES[g.dtype]}>")
    weight, inv_std = cupy.ascontiguousarray(weight), cupy.ascontiguousarray(inv_std)
    arguments = (g, x_hat, weight, inv_std, np.int64(rows), np.int32(channels), grad_x, grad_weight, grad_bias)
    kernel((channels,), (_BATCHNORM_THREADS,), arguments)
    return F._from_channel_matrix(grad_x, tuple(grad_y.shape)), grad_weight, grad_bias


def sgd_update_in_place(param, grad, velocity, lr, momentum, nesterov, weight_decay, first: bool) -> None:
    """One SGD step over flat buffers in one kernel: ``param`` and ``velocity`` (None without momentum) in place."""
    if velocity is None:
        _sgd_plain(grad, lr, weight_decay, param)
    else:
        _sgd_momentum(grad, lr, momentum, weight_decay, nesterov, first, param, velocity)


def adam_update_in_place(param, grad, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, decoupled, step) -> None:
    """One Adam (or AdamW) step over flat buffers in one kernel; the moments start at zero."""
    beta1, beta2 = betas
    step_size = lr / (1.0 - beta1**step)
    denom_scale = 1.0 / math.sqrt(1.0 - beta2**step)
    _adam(grad, lr, beta1, beta2, eps, step_size, denom_scale, weight_decay, decoupled, param, exp_avg, exp_avg_sq)
