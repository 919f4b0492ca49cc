"""Finite-difference gradient checks in float64 for every layer and the loss, on every backend."""

import numpy as np
import pytest
from helpers import RESIDUAL_CASES, numerical_gradient, relative_error, residual_block

from xpcnn import functional as F
from xpcnn import nn
from xpcnn.backends.backend import to_host

TOLERANCE = 1e-6


def check_layer(backend, layer, x, *, reseed=None):
    """Compare backward() with central differences of sum(forward(x) * r), for the input and every parameter.

    ``reseed(layer)`` runs before each forward pass (to replay a stochastic layer's randomness).
    """
    xp = backend.xp
    layer.to(backend, xp.float64)
    rng = np.random.default_rng(1)

    def objective(x_host):
        if reseed:
            reseed(layer)
        return float(np.sum(to_host(layer.forward(backend.asarray(x_host))) * r))

    if reseed:
        reseed(layer)
    y = layer.forward(backend.asarray(x))
    r = rng.standard_normal(tuple(y.shape))
    grad_x = to_host(layer.backward(backend.asarray(r)))
    assert grad_x.shape == x.shape
    errors = {"input": relative_error(grad_x, numerical_gradient(objective, x.copy()))}

    for name in list(layer.params):
        analytic = to_host(layer.grads[name])
        param = to_host(layer.params[name]).copy()

        def objective_p(p_host, name=name):
            layer.params[name] = backend.asarray(p_host)
            return objective(x)

        numeric = numerical_gradient(objective_p, param)
        layer.params[name] = backend.asarray(param)
        assert analytic.shape == param.shape
        errors[name] = relative_error(analytic, numeric)
    assert max(errors.values()) <= TOLERANCE, errors
    return errors


def random_input(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize(
    "n, c, h, w, o, kernel, stride, padding",
    [
        (2, 3, 7, 6, 4, 3, 1, 0),  # odd shapes
        (1, 2, 8, 7, 3, (3, 2), 2, 1),  # batch of 1, stride > 1, padding, rectangular kernel
        (2, 1, 9, 9, 2, 4, (2, 3), (2, 1)),  # stride and padding differ per axis
        (3, 2, 5, 5, 2, 5, 1, 0),  # kernel covers the whole input: 1x1 output
        (2, 2, 4, 3, 3, 2, 1, (3, 2)),  # stride 1, padding >= kernel: the input gradient takes col2im
    ],
)
def test_conv2d_gradients(backend, n, c, h, w, o, kernel, stride, padding):
    layer = nn.Conv2d(c, o, kernel, stride=stride, padding=padding, rng=0)
    layer.params["bias"] = np.random.default_rng(2).standard_normal(o)
    check_layer(backend, layer, random_input(n, c, h, w))


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 1e-4)])
def test_conv2d_gradients_where_xla_aborts_match_differences_and_torch(backend, dtype, tolerance):
    """Kernel (2, 3), stride 2, padding 1 on a 4x3 input with 5 channels (the fast path on JAX): XLA:CPU aborted
    compiling its input gradient, which the reference computes instead.  Central differences, then PyTorch."""
    torch = pytest.importorskip("torch")
    x = random_input(1, 5, 4, 3)
    if dtype == "float64":
        check_layer(backend, nn.Conv2d(5, 2, (2, 3), stride=2, padding=1, rng=0), x)
    layer = nn.Conv2d(5, 2, (2, 3), stride=2, padding=1, rng=0).to(backend, getattr(backend.xp, dtype))
    y = layer.forward(backend.asarray(x.astype(dtype)))
    grad_y = np.random.default_rng(1).standard_normal(tuple(y.shape)).astype(dtype)
    grad_x = layer.backward(backend.asarray(grad_y))
    tx = torch.tensor(x.astype(dtype), requires_grad=True)
    tparams = {k: torch.tensor(to_host(v), requires_grad=True) for k, v in layer.params.items()}
    torch.nn.functional.conv2d(tx, tparams["weight"], tparams["bias"], stride=2, padding=1).backward(
        torch.tensor(grad_y)
    )
    assert relative_error(to_host(grad_x), tx.grad.numpy()) <= tolerance
    for name, value in tparams.items():
        assert relative_error(to_host(layer.grads[name]), value.grad.numpy()) <= tolerance, name


def test_conv2d_without_bias_gradients(backend):
    layer = nn.Conv2d(2, 3, 2, bias=False, rng=0)
    errors = check_layer(backend, layer, random_input(2, 2, 5, 4))
    assert set(errors) == {"input", "weight"}


def test_conv2d_backward_skips_the_bias_gradient_it_is_not_asked_for(backend):
    """A layer without a bias spends no operation on a bias gradient; the other gradients are unchanged."""
    x = backend.asarray(random_input(2, 2, 5, 4))
    weight = backend.asarray(np.random.default_rng(3).standard_normal((3, 2, 2, 2)))
    y, cols = F.conv2d_forward(x, weight, None)
    grad_y = backend.asarray(np.random.default_rng(4).standard_normal(tuple(y.shape)))
    with_bias = F.conv2d_backward(grad_y, cols, weight, tuple(x.shape))
    without = F.conv2d_backward(grad_y, cols, weight, tuple(x.shape), bias_grad=False)
    assert without[2] is None and with_bias[2] is not None
    for a, b in zip(with_bias[:2], without[:2], strict=True):
        assert np.array_equal(to_host(a), to_host(b))


@pytest.mark.parametrize(
    "n, c, h, w, kernel, stride",
    [
        (2, 3, 8, 8, 2, None),  # non-overlapping
        (1, 2, 7, 9, 3, 2),  # overlapping windows, odd sizes, batch of 1
        (2, 1, 9, 7, (2, 3), (1, 2)),  # rectangular
        (2, 2, 9, 9, 4, 4),  # the seed model's pool, with leftover rows and columns
    ],
)
def test_maxpool_gradients(backend, n, c, h, w, kernel, stride):
    check_layer(backend, nn.MaxPool2d(kernel, stride), random_input(n, c, h, w))


def test_relu_gradients(backend):
    check_layer(backend, nn.ReLU(), random_input(3, 2, 5, 4))


def test_flatten_gradients(backend):
    check_layer(backend, nn.Flatten(), random_input(2, 3, 4, 5))


@pytest.mark.parametrize("n, i, o", [(4, 7, 3), (1, 5, 5)])
def test_linear_gradients(backend, n, i, o):
    layer = nn.Linear(i, o, rng=0)
    layer.params["bias"] = np.random.default_rng(2).standard_normal(o)
    check_layer(backend, layer, random_input(n, i))


def test_dropout_gradients(backend):
    layer = nn.Dropout(0.3)
    check_layer(backend, layer, random_input(4, 3, 5), reseed=lambda layer: layer.set_generator(backend.generator(7)))


def check_model(backend, model, x):
    """:func:`check_layer` for a container: the input gradient and every named parameter's gradient, each
    against central differences of sum(forward(x) * r); then the parameter gradients of a backward pass
    with ``input_grad=False`` (what training runs) equal those of the full one."""
    model.to(backend, backend.xp.float64)

    def objective(x_host):
        return float(np.sum(to_host(model.forward(backend.asarray(x_host))) * r))

    y = model.forward(backend.asarray(x))
    r = np.random.default_rng(1).standard_normal(tuple(y.shape))
    grad_x = to_host(model.backward(backend.asarray(r)))
    errors = {"input": relative_error(grad_x, numerical_gradient(objective, x.copy()))}
    grads = {name: to_host(grad) for name, grad in model.named_gradients()}
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, grad in grads.items():
        param = to_host(dict(model.named_parameters())[name]).copy()

        def objective_p(p_host, name=name):
            model.set_parameters({name: backend.asarray(p_host)})
            return objective(x)

        errors[name] = relative_error(grad, numerical_gradient(objective_p, param))
        model.set_parameters({name: backend.asarray(param)})
    assert max(errors.values()) <= TOLERANCE, errors
    model.zero_grad()
    model.forward(backend.asarray(x))
    assert model.backward(backend.asarray(r), input_grad=False) is None
    for name, grad in model.named_gradients():
        np.testing.assert_allclose(to_host(grad), grads[name], rtol=1e-12, atol=1e-14, err_msg=name)
    return errors


def test_sequential_gradients(backend):
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, rng=0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, stride=2, rng=1),
        nn.Flatten(),
        nn.Linear(8, 4, rng=2),
    )
    check_model(backend, model, random_input(2, 1, 8, 8))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 2, 1, 1)])
def test_global_avgpool_gradients(backend, shape):
    check_layer(backend, nn.GlobalAvgPool2d(), random_input(*shape))


def randomise_batchnorm(model, seed=4):
    """Batch norm's weight and bias drawn at random, so that their gradients and the input's are not special."""
    rng = np.random.default_rng(seed)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.params["weight"] = rng.standard_normal(layer.num_features)
            layer.params["bias"] = rng.standard_normal(layer.num_features)
    return model


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_residual_gradients(backend, case):
    """The two paths' gradients summed: identity shortcut, projection, batch norm in the branch and the projection."""
    errors = check_model(backend, randomise_batchnorm(residual_block(case)), random_input(2, 2, 6, 5))
    assert any(name.startswith("branch.") for name in errors)
    assert any(name.startswith("projection.") for name in errors) == (case != "identity")


def test_residual_inside_sequential_gradients(backend):
    """A residual block between layers, then global average pooling: the gradients reach through the block,
    and a backward pass without an input gradient starts at the block (the first layer with parameters)."""
    model = nn.Sequential(
        nn.ReLU(), residual_block("batch-norm"), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(4, 3, rng=3)
    )
    check_model(backend, randomise_batchnorm(model), random_input(3, 2, 5, 6))


@pytest.mark.parametrize("n, k, smoothing", [(5, 4, 0.0), (1, 10, 0.0), (4, 6, 0.2)])
def test_cross_entropy_gradient(backend, n, k, smoothing):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((n, k)) * 3
    labels = backend.asarray(rng.integers(0, k, n).astype(np.int64))
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    loss.forward(backend.asarray(logits), labels)
    analytic = to_host(loss.backward())
    numeric = numerical_gradient(lambda z: float(loss.forward(backend.asarray(z), labels)), logits.copy())
    assert relative_error(analytic, numeric) <= TOLERANCE


@pytest.mark.parametrize("make_layer, shape", [(nn.BatchNorm2d, (4, 3, 5, 3)), (nn.BatchNorm1d, (6, 5))])
def test_batchnorm_gradients(backend, make_layer, shape):
    layer = make_layer(shape[1])  # a fresh layer per backend: gradients add up across backward passes
    rng = np.random.default_rng(4)
    layer.params["weight"] = rng.standard_normal(shape[1])
    layer.params["bias"] = rng.standard_normal(shape[1])
    check_layer(backend, layer, random_input(*shape) * 2 + 0.5)
