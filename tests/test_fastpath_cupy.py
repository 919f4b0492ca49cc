"""CuPy's fused kernels against the Array API reference path they replace (skipped without a GPU)."""

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn import models, nn, optim
from xpcnn.backends.backend import cuda_problem, get_backend, to_host
from xpcnn.ops import fastpath

if cuda_problem() is not None:
    pytest.skip(cuda_problem(), allow_module_level=True)

cupy = pytest.importorskip("cupy")
fused = pytest.importorskip("xpcnn.ops.fastpath_cupy")

DTYPES = ["float32", "float64"]


def sample(shape, dtype, seed=0, quantise=False, channels_last=True):
    """A CuPy array (N, C, H, W); channels-last memory viewed as NCHW (as convolutions make), or plain NCHW."""
    n, c, h, w = shape
    values = np.random.default_rng(seed).standard_normal((n, h, w, c) if channels_last else shape)
    if quantise:
        values = np.round(values * 2) / 2  # ties in most windows
    array = cupy.asarray(values.astype(dtype))
    return array.transpose(0, 3, 1, 2) if channels_last else array


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 9, 7), (1, 4, 25, 25)])
@pytest.mark.parametrize("kernel", [(2, 2), (4, 4), (3, 2), (1, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_maxpool_kernels_equal_the_reference(dtype, shape, kernel, channels_last):
    x = sample(shape, dtype, quantise=True, channels_last=channels_last)
    y_ref, record_ref = F.maxpool2d_forward(x, kernel, kernel)
    y, record = fused.maxpool2d_forward(x, kernel, kernel)
    assert y.shape == y_ref.shape and cupy.array_equal(y, y_ref)
    grad_y = sample(tuple(y.shape), dtype, seed=1, channels_last=False)
    expected = F.maxpool2d_backward(grad_y, record_ref, x.shape, kernel, kernel)
    got = fused.maxpool2d_backward(grad_y, record, x.shape, kernel, kernel)
    assert got.shape == expected.shape and cupy.array_equal(got, expected)
    inference, no_record = fused.maxpool2d_forward(x, kernel, kernel, record=False)
    assert no_record is None and cupy.array_equal(inference, y_ref)


def test_maxpool_overlapping_windows_fall_back_to_the_reference():
    x = sample((2, 3, 9, 9), "float32")
    y, record = fused.maxpool2d_forward(x, (3, 3), (2, 2))
    assert cupy.array_equal(y, F.maxpool2d_forward(x, (3, 3), (2, 2))[0]) and isinstance(record, tuple)


CONV_CASES = [
    # (N, C, H, W, O, kernel, stride, padding)
    (2, 8, 9, 9, 4, (3, 3), (1, 1), (0, 0)),
    (2, 16, 10, 7, 3, (3, 2), (1, 1), (1, 2)),
    (1, 8, 11, 11, 2, (5, 5), (2, 1), (2, 2)),
    (3, 1, 12, 10, 4, (4, 4), (1, 1), (0, 0)),
    (2, 3, 6, 6, 2, (2, 2), (1, 1), (3, 2)),  # padding >= kernel: the reference takes col2im
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c, h, w, o, kernel, stride, padding", CONV_CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_im2col_and_input_gradient_kernels_equal_the_reference(
    dtype, n, c, h, w, o, kernel, stride, padding, channels_last
):
    x = sample((n, c, h, w), dtype, channels_last=channels_last)
    assert cupy.array_equal(fused.im2col(x, kernel, stride, padding), F.im2col(x, kernel, stride, padding))
    rng = np.random.default_rng(2)
    weight = cupy.asarray(rng.standard_normal((o, c, *kernel)).astype(dtype))
    oh, ow = F.output_size(h, kernel[0], stride[0], padding[0]), F.output_size(w, kernel[1], stride[1], padding[1])
    grad = cupy.asarray(rng.standard_normal((n * oh * ow, o)).astype(dtype))
    expected = F.input_gradient(grad, weight, (n, c, h, w), stride, padding)
    got = fused.input_gradient(grad, weight, (n, c, h, w), stride, padding)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_host(got), to_host(expected), rtol=rtol, atol=rtol * float(abs(expected).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_kernel_equals_the_reference_and_keeps_the_layout(dtype):
    y = cupy.maximum(sample((2, 3, 5, 4), dtype, quantise=True), 0)
    grad_y = sample((2, 3, 5, 4), dtype, seed=1, channels_last=False)
    got = fused.relu_backward(grad_y, y)
    assert cupy.array_equal(got, F.relu_backward(grad_y, y)) and got.strides == y.strides


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernel_equals_the_reference(dtype):
    x = cupy.asarray(np.random.default_rng(0).standard_normal((8, 50)).astype(dtype))
    uniform = cupy.asarray(np.random.default_rng(1).random((8, 50)).astype(dtype))
    y, mask = fused.dropout_forward(x, uniform, 0.25)
    y_ref, mask_ref = F.dropout_forward(x, uniform, 0.25)
    assert cupy.array_equal(mask, mask_ref) and cupy.array_equal(y, y_ref)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("n", [1, 128, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_kernel_equals_the_reference(dtype, rtol, n, smoothing):
    rng = np.random.default_rng(n)
    logits = cupy.asarray((rng.standard_normal((n, 10)) * 5).astype(dtype))
    labels = cupy.asarray(rng.integers(0, 10, n))
    loss, grad = fused.cross_entropy(logits, labels, smoothing)
    loss_ref, grad_ref = F.cross_entropy(logits, labels, smoothing)
    assert loss.shape == () and loss.dtype == logits.dtype
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=rtol)
    np.testing.assert_allclose(to_host(grad), to_host(grad_ref), rtol=rtol, atol=rtol / n)


def test_cross_entropy_kernel_propagates_nan():
    logits = cupy.zeros((4, 10), cupy.float32)
    logits[2, 3] = cupy.nan
    loss, _ = fused.cross_entropy(logits, cupy.asarray([0, 1, 2, 3]))
    assert cupy.isnan(loss)


@pytest.mark.parametrize("model_name", ["convnet", "convnet-bn", "seed"])
def test_a_training_step_with_and_without_the_fused_kernels(monkeypatch, model_name):
    """The same loss and gradients from a whole forward and backward pass, fused kernels on and off."""
    backend = get_backend("cupy")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((16, 1, 28, 28)), backend.xp.float64)
    labels = backend.asarray(rng.integers(0, 10, 16))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", enabled)
        model = models.build(model_name, seed=0).to(backend, backend.xp.float64)
        model.set_generator(backend.generator(3))
        loss_fn = nn.CrossEntropyLoss(check_labels=False)
        loss = loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward(), input_grad=False)
        grads = {k: to_host(g) for k, g in model.named_gradients()}
        results.append((float(loss), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for key in grads_a:
        np.testing.assert_allclose(grads_a[key], grads_b[key], rtol=1e-9, atol=1e-12)


OPTIMIZERS = {
    "sgd": lambda m: optim.SGD(m, lr=0.1),
    "sgd+wd": lambda m: optim.SGD(m, lr=0.1, weight_decay=0.01),
    "momentum": lambda m: optim.SGD(m, lr=0.1, momentum=0.9),
    "nesterov+wd": lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam+l2": lambda m: optim.Adam(m, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
    "adamw": lambda m: optim.AdamW(m, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimiser_updates_equal_the_reference(monkeypatch, name):
    """Three steps over the flat buffers, fused kernel on and off: the same parameters and state."""
    backend = get_backend("cupy")
    rng = np.random.default_rng(0)
    grads = [{"0.weight": rng.standard_normal((3, 4)), "0.bias": rng.standard_normal(3)} for _ in range(3)]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", enabled)
        model = nn.Sequential(nn.Linear(4, 3, rng=1)).to(backend, backend.xp.float64)
        optimizer = OPTIMIZERS[name](model)
        for step in grads:
            for key, value in step.items():
                model[0].grads[key.split(".")[1]] = backend.asarray(value)
            optimizer.step()
        results.append(({k: to_host(v) for k, v in model.named_parameters()}, optimizer.state_dict()["state"]))
    (params_a, state_a), (params_b, state_b) = results
    for key in params_a:
        np.testing.assert_allclose(params_a[key], params_b[key], rtol=1e-12, atol=1e-14)
        for slot in state_b[key]:
            np.testing.assert_allclose(state_a[key][slot], state_b[key][slot], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("shape", [(16, 32, 13, 13), (4, 3, 5, 7), (64, 10), (2, 5, 1, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batchnorm_kernels_equal_the_reference(dtype, rtol, shape, channels_last):
    rng = np.random.default_rng(4)
    if len(shape) == 2:
        x = cupy.asarray((rng.standard_normal(shape) * 3 + 1).astype(dtype))
    else:
        x = sample(shape, dtype, channels_last=channels_last) * 3 + 1
    weight = cupy.asarray(rng.standard_normal(shape[1]).astype(dtype))
    bias = cupy.asarray(rng.standard_normal(shape[1]).astype(dtype))
    got = fused.batchnorm_forward(x, weight, bias, 1e-5)
    expected = F.batchnorm_forward(x, weight, bias, 1e-5)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(to_host(a), to_host(b), rtol=rtol, atol=rtol)
    grad_y = cupy.empty_like(got[0])  # the layout of the forward's output, as ReLU's backward keeps it
    grad_y[...] = cupy.asarray(rng.standard_normal(shape).astype(dtype))
    got_back = fused.batchnorm_backward(grad_y, got[1], got[2], weight)
    expected_back = F.batchnorm_backward(grad_y, expected[1], expected[2], weight)
    for a, b in zip(got_back, expected_back, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(to_host(a), to_host(b), rtol=rtol * 10, atol=rtol * 10)
