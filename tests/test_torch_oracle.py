"""Forward and backward of each layer against PyTorch on the CPU (skipped where torch is absent)."""

import numpy as np
import pytest
from helpers import RESIDUAL_CASES, relative_error, residual_block, small_resnet

from xpcnn import nn
from xpcnn.backends.backend import to_host

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


# --- global average pooling and residual blocks ---


class TorchResidual(torch.nn.Module):
    """The PyTorch twin of :class:`xpcnn.nn.Residual`: attributes ``branch`` then ``projection`` (None: identity)."""

    def __init__(self, branch, projection=None):
        super().__init__()
        self.branch, self.projection = branch, projection

    def forward(self, x):
        return self.branch(x) + (x if self.projection is None else self.projection(x))


def torch_twin_of(layer):
    """A PyTorch module of the same architecture as the xpcnn ``layer`` (containers included), untrained."""
    if isinstance(layer, nn.Sequential):
        return torch.nn.Sequential(*(torch_twin_of(child) for child in layer))
    if isinstance(layer, nn.Residual):
        projection = None if layer.projection is None else torch_twin_of(layer.projection)
        return TorchResidual(torch_twin_of(layer.branch), projection)
    if isinstance(layer, nn.Conv2d):
        bias = "bias" in layer.params
        return torch.nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, bias=bias
        )
    if isinstance(layer, nn.BatchNorm2d):
        return torch.nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum)
    if isinstance(layer, nn.Linear):
        return torch.nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, nn.GlobalAvgPool2d):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert isinstance(layer, nn.ReLU), layer
    return torch.nn.ReLU()


def loaded_twin(model, dtype):
    """The torch twin of ``model`` with its state dict loaded strictly: every name of one is a name of the other
    (batch norm's ``num_batches_tracked``, which xpcnn does not keep, given as 0)."""
    twin = torch_twin_of(model).to(getattr(torch, dtype))
    state = {name: torch.tensor(value) for name, value in model.state_dict().items()}
    tracked = {name for name in twin.state_dict() if name.endswith("num_batches_tracked")}
    state.update({name: torch.tensor(0) for name in tracked})
    twin.load_state_dict(state, strict=True)  # raises on a missing or unexpected name
    assert set(twin.state_dict()) == set(model.state_dict()) | tracked
    assert [name for name, _ in twin.named_parameters()] == [name for name, _ in model.named_parameters()]
    return twin


def test_global_avgpool_matches_torch(backend, dtype):
    def torch_pool(x):
        return torch.flatten(torch.nn.AdaptiveAvgPool2d(1)(x), 1)

    run_both(backend, dtype, nn.GlobalAvgPool2d(), torch_pool, sample(3, 4, 5, 7))


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_residual_matches_torch(backend, dtype, case):
    """Training-mode forward and backward of a block against its torch twin, two steps: the output, the input
    gradient and every parameter's gradient by name; then evaluation mode, with the running statistics."""
    block = residual_block(case)
    block.to(backend, getattr(backend.xp, dtype))
    twin = loaded_twin(block, dtype)
    tol = TOLERANCES[dtype]
    for step in range(2):
        block.zero_grad()
        twin.zero_grad()
        x = (sample(3, 2, 7, 6, seed=step) * 2 + 0.5).astype(dtype)
        y = block.forward(backend.asarray(x))
        grad_y = np.random.default_rng(5 + step).standard_normal(tuple(y.shape)).astype(dtype)
        grad_x = block.backward(backend.asarray(grad_y))
        tx = torch.tensor(x, requires_grad=True)
        ty = twin(tx)
        ty.backward(torch.tensor(grad_y))
        assert relative_error(to_host(y), ty.detach().numpy()) <= tol
        assert relative_error(to_host(grad_x), tx.grad.numpy()) <= tol
        torch_grads = {name: param.grad.numpy() for name, param in twin.named_parameters()}
        grads = dict(block.named_gradients())
        assert grads.keys() == torch_grads.keys()
        for name, grad in grads.items():
            assert relative_error(to_host(grad), torch_grads[name]) <= tol, name
    block.eval()
    twin.eval()
    x = sample(2, 2, 7, 6, seed=9).astype(dtype)
    assert relative_error(to_host(block.forward(backend.asarray(x))), twin(torch.tensor(x)).detach().numpy()) <= tol


def test_residual_running_statistics_match_torch(backend, dtype):
    """Batch norm inside the branch and the projection updates its running statistics as torch's does."""
    block = residual_block("batch-norm")
    block.to(backend, getattr(backend.xp, dtype))
    twin = loaded_twin(block, dtype)
    for step in range(3):
        x = (sample(4, 2, 6, 6, seed=step) * 3 - 1).astype(dtype)
        block.forward(backend.asarray(x))
        with torch.no_grad():
            twin(torch.tensor(x))
    buffers = dict(twin.named_buffers())
    names = [name for name, _ in block.named_buffers()]
    assert len(names) == 6
    for name, value in block.named_buffers():
        assert relative_error(to_host(value), buffers[name].numpy()) <= TOLERANCES[dtype], name


def test_a_resnet_state_dict_loads_strictly_into_its_torch_twin(backend, dtype):
    """Nested names (``"3.branch.0.weight"``, ``"5.projection.1.running_var"``) are PyTorch's for the same modules."""
    model = small_resnet(seed=3)
    model.to(backend, getattr(backend.xp, dtype))
    x = sample(2, 1, 28, 28).astype(dtype)
    model.train()
    for step in range(2):  # non-trivial running statistics
        model.forward(backend.asarray(sample(4, 1, 28, 28, seed=step).astype(dtype)))
    twin = loaded_twin(model, dtype)
    assert "5.projection.1.running_var" in model.state_dict() and "3.branch.0.weight" in model.state_dict()
    model.eval()
    twin.eval()
    expected = twin(torch.tensor(x)).detach().numpy()
    assert relative_error(to_host(model.forward(backend.asarray(x))), expected) <= TOLERANCES[dtype]
