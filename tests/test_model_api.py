"""The model API a PyTorch user expects: parameter names, gradient accumulation, zero_grad, summary."""

import numpy as np
import pytest
from helpers import small_resnet

from xpcnn import models, nn, optim
from xpcnn.backends.backend import get_backend, to_host


def small_model(backend):
    """Conv, pool, ReLU, linear in float64: no batch norm or dropout, so samples do not interact."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, rng=0), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4, rng=1)
    )
    return model.to(backend, backend.xp.float64)


def batch(backend, n=8):
    rng = np.random.default_rng(5)
    return backend.asarray(rng.standard_normal((n, 1, 8, 8))), backend.asarray(rng.integers(0, 4, n))


def host_gradients(model) -> dict:
    return {name: to_host(grad) for name, grad in model.named_gradients()}


def test_named_parameters_follow_pytorch_names_and_state_dict():
    model = models.build("convnet-bn", seed=0)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "2.weight", "2.bias", "4.weight", "6.weight", "6.bias", "10.weight", "10.bias"]
    assert [name for name, _ in model.named_buffers()] == [
        "2.running_mean",
        "2.running_var",
        "6.running_mean",
        "6.running_var",
    ]
    assert set(model.state_dict()) == set(names) | {name for name, _ in model.named_buffers()}
    assert [p is q for p, (_, q) in zip(model.parameters(), model.named_parameters(), strict=True)] == [True] * 8
    assert model.num_parameters() == sum(p.size for p in model.parameters())
    linear = nn.Linear(3, 2)
    assert [name for name, _ in linear.named_parameters()] == ["weight", "bias"]


def test_sequential_has_no_parameter_dicts_of_its_own():
    """Its layers hold the dicts; an empty ``model.params`` that looks like "no parameters" is gone."""
    model = models.build("seed", seed=0)
    with pytest.raises(AttributeError):
        model.params  # noqa: B018
    with pytest.raises(AttributeError):
        model.grads  # noqa: B018


def test_nested_sequential_names_its_parameters_by_path(backend):
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3, rng=0), nn.ReLU()), nn.Linear(3, 1, rng=1)).to(backend)
    assert [name for name, _ in model.named_parameters()] == ["0.0.weight", "0.0.bias", "1.weight", "1.bias"]
    state = model.state_dict()
    model.load_state_dict({key: value + 1.0 for key, value in state.items()})
    assert np.array_equal(to_host(model[0][0].params["weight"]), state["0.0.weight"] + 1.0)


def test_half_batch_backwards_accumulate_to_the_full_batch_gradient(backend):
    """Micro-batch accumulation: two half batches, each loss scaled by 1/2, give the full batch's gradients."""
    model, loss_fn = small_model(backend), nn.CrossEntropyLoss()
    x, y = batch(backend)
    model.zero_grad()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    full = host_gradients(model)

    model.zero_grad()
    assert host_gradients(model) == {}
    for half in (slice(0, 4), slice(4, 8)):
        loss_fn.forward(model.forward(x[half, ...]), y[half])
        model.backward(loss_fn.backward() * 0.5)
    accumulated = host_gradients(model)
    assert set(accumulated) == set(full) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    for name in full:
        np.testing.assert_allclose(accumulated[name], full[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_backward_adds_until_zero_grad_and_step_needs_a_backward(backend):
    model, loss_fn = small_model(backend), nn.CrossEntropyLoss()
    opt = optim.SGD(model, lr=0.1)
    x, y = batch(backend)
    for _ in range(2):
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
    twice = host_gradients(model)
    opt.zero_grad()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward(), input_grad=False)
    once = host_gradients(model)
    for name in once:
        np.testing.assert_allclose(twice[name], 2 * once[name], rtol=1e-12, err_msg=name)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="call backward"):
        opt.step()


def test_summary_lists_output_shapes_and_parameter_counts(backend):
    model = models.build("convnet", seed=0).to(backend)
    model.train()
    text = model.summary(input_shape=(1, 28, 28))
    lines = text.splitlines()
    assert lines[0].split() == ["#", "Layer", "Output", "shape", "Params"]
    assert "(None, 32, 26, 26)" in lines[2] and lines[2].endswith(" 320")
    assert "(None, 10)" in lines[-3] and lines[-3].endswith(" 16,010")
    assert lines[-1] == f"Total parameters: {model.num_parameters():,}"
    assert model.training and all(layer.training for layer in model)  # the modes are put back
    assert "Output shape" not in model.summary()
    with pytest.raises(ValueError, match="expected input of shape"):
        model.summary(input_shape=(3, 28, 28))


def test_a_summary_between_forward_and_backward_changes_nothing(backend):
    """summary() traces in evaluation mode and puts the caches back: the backward after it gives the same gradients,
    nested containers and batch norm included."""
    rng = np.random.default_rng(6)
    cases = [(small_model(backend), (1, 8, 8)), (small_resnet(seed=0).to(backend, backend.xp.float64), (1, 28, 28))]
    for model, shape in cases:
        x = backend.asarray(rng.standard_normal((4, *shape)))
        results = []
        for summarise in (False, True):
            model.zero_grad()
            y = model.forward(x)
            if summarise:
                assert "Output shape" in model.summary(input_shape=shape)
            grad_x = to_host(model.backward(backend.asarray(np.ones(tuple(y.shape)))))
            results.append((grad_x, host_gradients(model)))
        (grad_x, grads), (grad_x_summarised, grads_summarised) = results
        assert np.array_equal(grad_x, grad_x_summarised)
        assert grads.keys() == grads_summarised.keys()
        assert all(np.array_equal(grads[name], grads_summarised[name]) for name in grads)


def test_set_parameters_refuses_unknown_names_and_other_shapes_and_assigns_nothing(backend):
    model = small_model(backend)
    before = {name: to_host(value) for name, value in model.named_parameters()}
    weight = model[0].params["weight"]
    for values, message in [
        ({"0.wieght": weight}, r"unknown parameter '0\.wieght'"),
        ({"9.weight": weight}, r"unknown parameter '9\.weight'"),
        ({"weight": weight}, r"unknown parameter 'weight'"),
        ({"0.bias": weight}, r"parameter 0\.bias has shape \(3, 1, 3, 3\), expected \(3,\)"),
        ({"0.weight": weight * 2.0, "4.weight": weight}, r"parameter 4\.weight has shape \(3, 1, 3, 3\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.set_parameters(values)
    after = {name: to_host(value) for name, value in model.named_parameters()}
    assert after.keys() == before.keys() and all(np.array_equal(after[name], before[name]) for name in before)
    with pytest.raises(ValueError, match=r"unknown buffer '0\.running_mean'"):
        model.set_buffers({"0.running_mean": weight})
    norm = nn.Sequential(nn.BatchNorm2d(3)).to(backend)
    with pytest.raises(ValueError, match=r"buffer 0\.running_var has shape \(4,\), expected \(3,\)"):
        norm.set_buffers({"0.running_var": backend.asarray(np.ones(4, np.float32))})


def test_backward_refuses_a_gradient_of_another_shape_dtype_or_library_than_the_output(backend):
    """Not an error from deep inside a layer's product, nor (on NumPy) float64 gradients made of float32 ones."""
    model, (x, _) = small_model(backend), batch(backend)
    model.forward(x)
    prefix = r"^Sequential\(5 layers\): gradient of shape, dtype and type "
    with pytest.raises(ValueError, match=prefix + r"\(4, 5\) .*, expected \(8, 4\) .*\(the last forward's output\)$"):
        model.backward(backend.asarray(np.zeros((4, 5))))
    with pytest.raises(ValueError, match=prefix + r"\(8, 4\) .*float32.*, expected \(8, 4\) .*float64"):
        model.backward(backend.asarray(np.zeros((8, 4), np.float32), backend.xp.float32))
    if backend.name != "numpy":
        with pytest.raises(ValueError, match=prefix + r"\(8, 4\) float64 ndarray, expected"):
            model.backward(np.zeros((8, 4)))
    assert tuple(model.backward(backend.asarray(np.zeros((8, 4)))).shape) == (8, 1, 8, 8)


def test_load_state_dict_keeps_copies_and_reads_pytorchs_batch_norm_counts():
    """On NumPy the model shared the caller's arrays; PyTorch's num_batches_tracked keys were refused."""
    model = models.build("lenet-bn", seed=0)
    state = models.build("lenet-bn", seed=1).state_dict()
    counts = {f"{name.rpartition('.')[0]}.num_batches_tracked": np.array(7) for name in state if "running_mean" in name}
    model.load_state_dict({**state, **counts})
    loaded = {name: value.copy() for name, value in model.state_dict().items()}
    for value in state.values():
        value[...] = 0
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, loaded[name])
    with pytest.raises(ValueError, match="unexpected"):
        model.load_state_dict({**state, "9.other": np.array(1)})


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_to_refuses_a_dtype_that_is_not_real_floating_and_leaves_the_weights(dtype):
    """PyTorch's Module.to refuses them too: the cast would truncate the weights to integers or to True."""
    model = models.build("lenet")
    before = {name: np.array(value) for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="^Sequential.to: dtype must be a real floating dtype"):
        model.to(get_backend("numpy"), dtype)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
