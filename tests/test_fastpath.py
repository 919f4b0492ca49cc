"""The NumPy and JAX fast paths against the Array API reference path they replace."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn import models, nn
from xpcnn.ops import fastpath


def channels_last(shape, seed=0, quantise=False):
    """A float64 NCHW view of channels-last memory, as convolutions produce; optionally with many ties."""
    n, c, h, w = shape
    values = np.random.default_rng(seed).standard_normal((n, h, w, c))
    if quantise:
        values = np.round(values * 2) / 2
    return values.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 9, 7), (1, 4, 25, 25)])
@pytest.mark.parametrize(
    "kernel, stride", [((2, 2), (2, 2)), ((4, 4), (4, 4)), ((3, 2), (3, 2)), ((3, 3), (2, 2)), ((1, 1), (1, 1))]
)
@pytest.mark.parametrize("grad_layout", ["channels-last", "nchw"])
def test_maxpool_fast_path_is_bit_identical(shape, kernel, stride, grad_layout):
    x = channels_last(shape, quantise=True)  # ties in most windows
    y_ref, record_ref = F.maxpool2d_forward(x, kernel, stride)
    y_fast, record_fast = fastpath.maxpool2d_forward(x, kernel, stride)
    assert np.array_equal(y_ref, y_fast)
    grad_y = np.random.default_rng(1).standard_normal(y_ref.shape)
    if grad_layout == "channels-last":
        grad_y = np.ascontiguousarray(grad_y.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    expected = F.maxpool2d_backward(grad_y, record_ref, x.shape, kernel, stride)
    assert np.array_equal(fastpath.maxpool2d_backward(grad_y, record_fast, x.shape, kernel, stride), expected)
    inference, no_record = fastpath.maxpool2d_forward(x, kernel, stride, record=False)
    assert no_record is None and np.array_equal(inference, y_ref)


CONV_CASES = [
    # (N, C, H, W, O, kernel, stride, padding)
    (2, 8, 9, 9, 4, (3, 3), (1, 1), (0, 0)),
    (2, 16, 10, 7, 3, (3, 2), (1, 1), (1, 2)),
    (1, 8, 11, 11, 2, (5, 5), (2, 1), (2, 2)),
    (2, 3, 8, 8, 4, (3, 3), (1, 1), (1, 1)),  # few channels: the transposed build
    (2, 8, 9, 9, 4, (3, 3), (2, 2), (0, 0)),  # column stride 2: the transposed build
    (3, 1, 12, 10, 4, (4, 4), (1, 1), (0, 0)),  # one channel
    (2, 1, 12, 12, 4, (5, 5), (2, 1), (2, 2)),
]


def reference_column_order(cols, c, kernel):
    """The fast path's (kh, kw, c) patch columns in the reference's (c, kh, kw) order."""
    rows, (kh, kw) = cols.shape[0], kernel
    return cols.reshape(rows, kh, kw, c).transpose(0, 3, 1, 2).reshape(rows, -1)


@pytest.mark.parametrize("n, c, h, w, o, kernel, stride, padding", CONV_CASES)
def test_im2col_fast_path_is_bit_identical(n, c, h, w, o, kernel, stride, padding):
    x = channels_last((n, c, h, w))
    expected = F.im2col(x, kernel, stride, padding)
    assert np.array_equal(reference_column_order(fastpath.im2col(x, kernel, stride, padding), c, kernel), expected)
    nchw = np.ascontiguousarray(x)  # a plain NCHW array works too
    fast = fastpath.im2col(nchw, kernel, stride, padding)
    assert np.array_equal(reference_column_order(fast, c, kernel), F.im2col(nchw, kernel, stride, padding))


@pytest.mark.parametrize("n, c, h, w, o, kernel, stride, padding", CONV_CASES)
def test_convolution_fast_path_matches(n, c, h, w, o, kernel, stride, padding):
    """Forward, weight and bias gradients (the fast path's own patch order and weight matrix) against the reference."""
    rng = np.random.default_rng(3)
    x, weight, bias = channels_last((n, c, h, w)), rng.standard_normal((o, c, *kernel)), rng.standard_normal(o)
    fast = fastpath.kernels(x)
    y, cols = fast.conv2d_forward(x, weight, bias, stride, padding)
    y_ref, cols_ref = F.conv2d_forward(x, weight, bias, stride, padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    grad_y = rng.standard_normal(y.shape)
    _, grad_w, grad_b = fast.conv2d_backward(grad_y, cols, weight, x.shape, stride, padding, input_grad=False)
    _, grad_w_ref, grad_b_ref = F.conv2d_backward(grad_y, cols_ref, weight, x.shape, stride, padding, input_grad=False)
    assert grad_w.flags.c_contiguous and grad_w.shape == weight.shape
    np.testing.assert_allclose(grad_w, grad_w_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_b, grad_b_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, c, h, w, o, kernel, stride, padding", CONV_CASES)
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_input_gradient_fast_path_matches(n, c, h, w, o, kernel, stride, padding, dtype, rtol):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((o, c, *kernel)).astype(dtype)
    oh, ow = F.output_size(h, kernel[0], stride[0], padding[0]), F.output_size(w, kernel[1], stride[1], padding[1])
    grad = rng.standard_normal((n * oh * ow, o)).astype(dtype)
    expected = F.input_gradient(grad, weight, (n, c, h, w), stride, padding)
    got = fastpath.input_gradient(grad, weight, (n, c, h, w), stride, padding)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_kernels_choose_numpy_fast_paths_only_for_numpy_arrays():
    assert fastpath.kernels(np.zeros(1)).maxpool2d_forward is fastpath.maxpool2d_forward
    assert fastpath.kernels(np.zeros(1)).cross_entropy is F.cross_entropy
    strict = pytest.importorskip("array_api_strict")
    assert fastpath.kernels(strict.zeros(1)) is F


def test_relu_backward_fast_path_is_bit_identical():
    y = np.maximum(channels_last((2, 3, 5, 4), quantise=True), 0.0)  # exact zeros where the input was <= 0
    grad_y = channels_last((2, 3, 5, 4), seed=1)
    fast = fastpath.relu_backward(grad_y, y)
    assert fast.dtype == grad_y.dtype and np.array_equal(fast, F.relu_backward(grad_y, y))


@pytest.mark.parametrize("shape", [(4, 8, 5, 6), (16, 3)])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_batchnorm_fast_paths_match(shape, dtype, rtol):
    """Forward (statistics as column sums) and backward (the weight gradient as a column sum) against the reference."""
    rng = np.random.default_rng(6)
    x = (channels_last(shape) if len(shape) == 4 else rng.standard_normal(shape)).astype(dtype) * 3 + 1
    weight, bias = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    forward = F.batchnorm_forward(x, weight, bias, 1e-5)
    _, x_hat, inv_std, _, _ = forward
    grad_y = rng.standard_normal(shape).astype(dtype)
    fast = fastpath.kernels(x)
    assert fast.batchnorm_backward is not F.batchnorm_backward
    pairs = [
        (fast.batchnorm_forward(x, weight, bias, 1e-5), forward),
        (fast.batchnorm_backward(grad_y, x_hat, inv_std, weight), F.batchnorm_backward(grad_y, x_hat, inv_std, weight)),
    ]
    for results, references in pairs:
        for got, expected in zip(results, references, strict=True):
            assert got.shape == expected.shape and got.dtype == expected.dtype
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


# Shapes whose input-gradient convolution XLA:CPU (jaxlib 0.10.2) aborts the process on (SIGABRT): kernel 2,
# stride 2, padding 1 along one axis, the other axis's output smaller than its kernel (fastpath_jax.aborts_xla).
XLA_ABORT_CASES = [
    (2, 16, 6, 3, 4, (2, 3), (2, 2), (1, 1)),  # the reproducer's second convolution
    (2, 16, 8, 5, 4, (2, 3), (2, 4), (1, 0)),
    (2, 16, 8, 8, 4, (2, 3), (2, 4), (1, 0)),
    (1, 16, 4, 8, 2, (3, 2), (1, 2), (0, 1)),  # along W
]


@pytest.mark.parametrize(
    "n, c, h, w, o, kernel, stride, padding",
    [
        *CONV_CASES,
        (2, 2, 5, 6, 3, (2, 2), (1, 1), (3, 2)),
        *XLA_ABORT_CASES,
        (2, 16, 2, 3, 4, (2, 3), (2, 2), (1, 1)),  # XLA swaps the operands, keeping H (output 2, which fits) as it is
    ],
)
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.slow  # JAX's eager reference
def test_jax_convolution_fast_path_matches(n, c, h, w, o, kernel, stride, padding, dtype, rtol):
    """XLA's convolutions, forward and all three gradients, against the reference (padding >= kernel included;
    the shapes XLA aborts on, whose input gradient is the reference's)."""
    pytest.importorskip("jax")
    from xpcnn.backends.backend import get_backend

    backend = get_backend("jax", "cpu")
    rng = np.random.default_rng(4)
    host = [rng.standard_normal(shape).astype(dtype) for shape in [(n, c, h, w), (o, c, *kernel), (o,)]]
    x, weight, bias = (backend.asarray(a) for a in host)
    fast = fastpath.kernels(x)
    assert fast.conv2d_forward is not F.conv2d_forward
    y, cache = fast.conv2d_forward(x, weight, bias, stride, padding)
    y_ref, cols = F.conv2d_forward(x, weight, bias, stride, padding)
    grad_y = backend.asarray(rng.standard_normal(y.shape).astype(dtype))
    got = [y, *fast.conv2d_backward(grad_y, cache, weight, x.shape, stride, padding)]
    expected = [y_ref, *F.conv2d_backward(grad_y, cols, weight, x.shape, stride, padding)]
    for name, a, b in zip(["y", "grad_x", "grad_weight", "grad_bias"], got, expected, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)
    assert fast.conv2d_backward(grad_y, cache, weight, x.shape, stride, padding, input_grad=False)[0] is None
    assert fast.conv2d_backward(grad_y, cache, weight, x.shape, stride, padding, bias_grad=False)[2] is None


def conv_axes(h, w, kernel, stride, padding):
    """aborts_xla's per-axis arguments for an (H, W) input: kernel, stride, padding, rows skipped, output size."""
    out = [F.output_size(size, k, s, p) for size, k, s, p in zip((h, w), kernel, stride, padding, strict=True)]
    skipped = [
        size + 2 * p - k - (o - 1) * s for size, k, s, p, o in zip((h, w), kernel, stride, padding, out, strict=True)
    ]
    return tuple(kernel), tuple(stride), tuple(padding), tuple(skipped), tuple(out)


def test_only_kernel_2_stride_2_padding_1_takes_the_reference_input_gradient():
    """A sweep of both axes over kernels 1-5, strides 1-4, paddings 0-3 and every remainder: XLA's abort needs
    kernel 2, stride 2, padding 1 along one axis; and the reproducer's shapes are among those it finds."""
    pytest.importorskip("jax")
    from xpcnn.ops.fastpath_jax import aborts_xla

    axes = [
        (k, s, p, size)
        for k in range(1, 6)
        for s in range(1, 5)
        for p in range(4)
        for size in range(max(1, k - 2 * p), max(1, k - 2 * p) + 2 * s + 2)
    ]
    found = set()
    for kh, sh, ph, h in axes:
        for kw, sw, pw, w in axes[::7]:
            for args in (conv_axes(h, w, (kh, kw), (sh, sw), (ph, pw)), conv_axes(w, h, (kw, kh), (sw, sh), (pw, ph))):
                if aborts_xla(*args):
                    assert (2, 2, 1) in [axis[:3] for axis in zip(*args[:3], strict=True)], args
                    found.add(args)
    assert len(found) > 100
    for _, _, h, w, _, kernel, stride, padding in XLA_ABORT_CASES:
        assert aborts_xla(*conv_axes(h, w, kernel, stride, padding))


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_the_named_models_keep_xla_input_gradients(name):
    """Every convolution of every named model (ResNet's strided 3x3, its 1x1 projections) keeps XLA's input gradient."""
    pytest.importorskip("jax")
    from xpcnn.ops.fastpath_jax import aborts_xla

    model = models.build(name, seed=0)
    model.forward(np.zeros((2, 1, 28, 28), np.float32))
    convolutions = [layer for layer in model.modules() if isinstance(layer, nn.Conv2d)]
    assert convolutions
    for layer in convolutions:
        _, _, h, w = layer._cache[1]
        assert not aborts_xla(*conv_axes(h, w, layer.kernel_size, layer.stride, layer.padding)), layer


# The reproducer of XLA's abort: training through the compiled JAX steps (xpcnn.fit) with a convolution whose
# input gradient XLA:CPU (jaxlib 0.10.2) killed the process on (SIGABRT, exit status 134).
XLA_ABORT_REPRODUCER = """
import numpy as np
import xpcnn
from xpcnn import nn

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, (2, 3), stride=2, padding=1), nn.Flatten(),
    nn.Linear(32, 10),
)
images = np.random.default_rng(0).integers(0, 256, (64, 6, 3), dtype=np.uint8)
history = xpcnn.fit(model, (images, np.arange(64) % 10), backend="jax", epochs=1)
print(np.isfinite(history.records[-1]["train_loss"]))
"""


@pytest.mark.slow  # compiles, in a process of its own: the abort would take pytest with it
def test_jax_training_on_shapes_xla_aborts_on_runs_to_the_end():
    pytest.importorskip("jax")
    result = subprocess.run([sys.executable, "-c", XLA_ABORT_REPRODUCER], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"]


@pytest.mark.slow  # compiles
def test_jax_compiler_options_give_xla_kernels_the_same_results(monkeypatch):
    """On the CPU the compiled steps run XLA's own kernels, not YNNPACK's, and compute the same as XLA's defaults."""
    jax = pytest.importorskip("jax")
    from xpcnn.backends.backend import get_backend
    from xpcnn.ops import fastpath_jax

    backend = get_backend("jax", "cpu")
    options = fastpath.compiler_options(backend.device)
    assert options == fastpath_jax.CPU_COMPILER_OPTIONS
    rng = np.random.default_rng(5)
    x, weight, bias = (
        backend.asarray(rng.standard_normal(s).astype(np.float32)) for s in [(8, 32, 13, 13), (64, 32, 3, 3), (64,)]
    )

    def step(x, weight, bias):  # the convnet's second convolution, forward and backward
        y, cache = fastpath_jax.conv2d_forward(x, weight, bias)
        return y, *fastpath_jax.conv2d_backward(y, cache, weight, x.shape)

    lowered = jax.jit(step).lower(x, weight, bias)
    ours, default = lowered.compile(compiler_options=options), lowered.compile()
    assert "__ynn_fusion" not in ours.as_text()
    for a, b in zip(ours(x, weight, bias), default(x, weight, bias), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())
    monkeypatch.setattr(fastpath, "ENABLED", False)
    assert fastpath.compiler_options(backend.device) == {}


# A child process that frees three 8 MB arrays a round (more than glibc keeps by default), after a
# convolution on NumPy arrays has or has not picked NumPy's fast paths, and prints the minor page faults
# of a round: every page of the three, refaulted, where the memory goes back to the OS.
FAULTS_A_ROUND = """
import resource
import numpy as np
from xpcnn.ops import fastpath

x, weight = np.ones((2, 1, 8, 8)), np.ones((4, 1, 3, 3))
fastpath.kernels(x).conv2d_forward(x, weight, None)

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        arrays = [np.ones(2_000_000, np.float32) for _ in range(3)]
        del arrays
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

faults(3)
print(faults(20))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("enabled", [True, False])
def test_numpy_fast_paths_keep_freed_memory_for_the_next_arrays(enabled):
    environment = {**os.environ, "XPCNN_FASTPATH": "1" if enabled else "0"}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_A_ROUND], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    faults = float(result.stdout)
    pages = 3 * 8_000_000 / 4096
    if enabled:
        assert faults < pages / 20, faults  # the freed pages are reused, not faulted in again
    else:
        assert faults > pages / 20, faults  # glibc's default, which the switch leaves alone
