"""Forward and backward of each layer against PyTorch on the CPU (skipped where torch is absent)."""

import numpy as np
import pytest
from helpers import relative_error

from xpcnn import nn
from xpcnn.backend import to_host

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Relative tolerances from the acceptance criteria.
TOLERANCES = {"float64": 1e-10, "float32": 1e-4}


@pytest.fixture(params=["float64", "float32"])
def dtype(request):
    return request.param


def run_both(backend, dtype, layer, torch_fn, x, grad_y_seed=5):
    """Forward and backward through ``layer`` on ``backend`` and through ``torch_fn`` on torch.

    ``torch_fn(x, **params)`` receives torch tensors that require grad.  Returns
    {what: relative error} for the output, the input gradient and each parameter gradient.
    """
    x = x.astype(dtype)
    layer.to(backend, getattr(backend.xp, dtype))
    y = layer.forward(backend.asarray(x))
    grad_y = np.random.default_rng(grad_y_seed).standard_normal(tuple(y.shape)).astype(dtype)
    grad_x = layer.backward(backend.asarray(grad_y))

    tx = torch.tensor(x, requires_grad=True)
    tparams = {k: torch.tensor(to_host(v), requires_grad=True) for k, v in layer.params.items()}
    ty = torch_fn(tx, **tparams)
    ty.backward(torch.tensor(grad_y))
    errors = {
        "output": relative_error(to_host(y), ty.detach().numpy()),
        "input": relative_error(to_host(grad_x), tx.grad.numpy()),
    }
    errors.update({k: relative_error(to_host(layer.grads[k]), t.grad.numpy()) for k, t in tparams.items()})
    assert max(errors.values()) <= TOLERANCES[dtype], errors


def sample(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize(
    "c, o, kernel, stride, padding",
    [(3, 5, 3, 1, 0), (2, 4, (3, 2), 2, 1), (1, 8, 4, 1, 0), (4, 3, 5, (2, 3), (2, 1))],
)
def test_conv2d_matches_torch(backend, dtype, c, o, kernel, stride, padding):
    layer = nn.Conv2d(c, o, kernel, stride=stride, padding=padding, rng=0)
    layer.params["bias"] = sample(o, seed=3)

    def torch_conv(x, weight, bias):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    run_both(backend, dtype, layer, torch_conv, sample(3, c, 11, 10))


@pytest.mark.parametrize("kernel, stride", [(2, None), (3, 2), (3, 1), (4, 4), ((2, 3), (1, 2))])
def test_maxpool_matches_torch(backend, dtype, kernel, stride):
    def torch_pool(x):
        return F.max_pool2d(x, kernel, stride)

    run_both(backend, dtype, nn.MaxPool2d(kernel, stride), torch_pool, sample(2, 3, 11, 9))


def test_maxpool_ties_match_torch(backend, dtype):
    # Quantised values make ties common; overlapping windows share them.
    x = np.round(sample(2, 2, 9, 9) * 1.5)

    def torch_pool(x):
        return F.max_pool2d(x, 3, 2)

    run_both(backend, dtype, nn.MaxPool2d(3, 2), torch_pool, x)


def test_linear_matches_torch(backend, dtype):
    layer = nn.Linear(13, 7, rng=0)
    layer.params["bias"] = sample(7, seed=3)
    run_both(backend, dtype, layer, F.linear, sample(6, 13))


def test_relu_matches_torch(backend, dtype):
    run_both(backend, dtype, nn.ReLU(), F.relu, sample(4, 3, 5, 5))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(backend, dtype, smoothing):
    logits = (sample(9, 10) * 4).astype(dtype)
    labels = np.random.default_rng(1).integers(0, 10, 9)
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    value = loss.forward(backend.asarray(logits), backend.asarray(labels))
    grad = loss.backward()

    t_logits = torch.tensor(logits, requires_grad=True)
    t_value = F.cross_entropy(t_logits, torch.tensor(labels), label_smoothing=smoothing)
    t_value.backward()
    assert relative_error(to_host(value), t_value.detach().numpy()) <= TOLERANCES[dtype]
    assert relative_error(to_host(grad), t_logits.grad.numpy()) <= TOLERANCES[dtype]


@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_matches_torch_in_both_modes(backend, dtype, dims):
    shape = (8, 4, 5, 3) if dims == 2 else (8, 4)
    layer = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(4, momentum=0.2)
    rng = np.random.default_rng(2)
    layer.params["weight"], layer.params["bias"] = rng.standard_normal(4), rng.standard_normal(4)
    torch_layer = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm1d)(4, momentum=0.2).to(
        getattr(torch, dtype)
    )
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor(layer.params["weight"]))
        torch_layer.bias.copy_(torch.tensor(layer.params["bias"]))

    def torch_bn(x, weight, bias):
        return F.batch_norm(x, torch_layer.running_mean, torch_layer.running_var, weight, bias, True, 0.2, 1e-5)

    for step in range(3):  # running statistics accumulate over several batches
        layer.zero_grad()  # each step's gradients on their own, as torch's are
        run_both(backend, dtype, layer, torch_bn, sample(*shape, seed=step) * 3 + 1)
    tol = TOLERANCES[dtype]
    assert relative_error(to_host(layer.buffers["running_mean"]), torch_layer.running_mean.numpy()) <= tol
    assert relative_error(to_host(layer.buffers["running_var"]), torch_layer.running_var.numpy()) <= tol
    layer.eval()
    torch_layer.eval()
    x = sample(*shape, seed=9).astype(dtype)
    expected = torch_layer(torch.tensor(x)).detach().numpy()
    assert relative_error(to_host(layer.forward(backend.asarray(x))), expected) <= tol


def test_batchnorm_recalibration_matches_torch_cumulative_average(backend, dtype):
    """For equal batches, recalibration is torch's momentum=None (cumulative average) after reset_running_stats()."""
    layer = nn.BatchNorm2d(4)
    layer.to(backend, getattr(backend.xp, dtype))
    torch_layer = torch.nn.BatchNorm2d(4, momentum=None).to(getattr(torch, dtype))
    torch_layer.reset_running_stats()
    batches = [(sample(6, 4, 5, 3, seed=step) * 2 + 1).astype(dtype) for step in range(3)]
    nn.recalibrate_batchnorm(nn.Sequential(layer), (backend.asarray(b) for b in batches))
    with torch.no_grad():
        for b in batches:
            torch_layer(torch.tensor(b))
    tol = TOLERANCES[dtype]
    assert relative_error(to_host(layer.buffers["running_mean"]), torch_layer.running_mean.numpy()) <= tol
    assert relative_error(to_host(layer.buffers["running_var"]), torch_layer.running_var.numpy()) <= tol
