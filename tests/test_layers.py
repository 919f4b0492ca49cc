"""Layer behaviour beyond gradients: input checks, modes, ties, parameters, named models."""

import re
import types

import numpy as np
import pytest
from helpers import residual_block, small_resnet

from xpcnn import models, nn
from xpcnn.backends.backend import get_backend, to_host
from xpcnn.training import step


def as_backend(backend, array):
    return backend.asarray(np.asarray(array))


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (
            nn.Conv2d(1, 8, 4),
            (2, 28, 28),
            r"Conv2d\(1, 8, kernel_size=\(4, 4\)\): expected input of shape \(N, 1, H, W\).*got \(2, 28, 28\)",
        ),
        (nn.Conv2d(1, 8, 4), (2, 3, 28, 28), r"expected input of shape \(N, 1, H, W\).*got \(2, 3, 28, 28\)"),
        (nn.Conv2d(1, 8, 4), (2, 1, 3, 28), r"H >= 4, W >= 4.*got \(2, 1, 3, 28\)"),
        (nn.MaxPool2d(2), (2, 8), r"MaxPool2d.*expected input of shape \(N, C, H, W\).*got \(2, 8\)"),
        (nn.Linear(288, 10), (2, 280), r"Linear\(288, 10\): expected input of shape \(N, 288\), got \(2, 280\)"),
        (nn.Linear(288, 10), (2, 1, 288), r"Linear.*got \(2, 1, 288\)"),
        (nn.GlobalAvgPool2d(), (2, 8), r"GlobalAvgPool2d\(\): expected input of shape \(N, C, H, W\), got \(2, 8\)"),
        (residual_block("identity"), (2, 3, 5, 5), r"Conv2d\(2, 2, .*expected input of shape \(N, 2, H, W\)"),
    ],
)
def test_wrong_shapes_raise_value_error_naming_the_layer(backend, layer, shape, message):
    layer.to(backend)
    with pytest.raises(ValueError, match=message):
        layer.forward(as_backend(backend, np.zeros(shape, np.float32)))


def test_wrong_dtype_raises_value_error(backend):
    conv = nn.Conv2d(1, 2, 3).to(backend)
    with pytest.raises(ValueError, match=r"Conv2d.*floating-point input, got dtype .*uint8"):
        conv.forward(as_backend(backend, np.zeros((1, 1, 5, 5), np.uint8)))
    with pytest.raises(ValueError, match=r"Conv2d.*expected .*float32 input .*got .*float64"):
        conv.forward(as_backend(backend, np.zeros((1, 1, 5, 5), np.float64)))
    with pytest.raises(ValueError, match=r"ReLU.*floating-point"):
        nn.ReLU().forward(as_backend(backend, np.zeros(3, np.int64)))


def test_loss_checks_labels(backend):
    loss = nn.CrossEntropyLoss()
    logits = as_backend(backend, np.zeros((3, 10), np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\], got values in \[0, 10\]"):
        loss.forward(logits, as_backend(backend, np.array([0, 10, 3])))
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        loss.forward(logits, as_backend(backend, np.array([0, -1, 3])))
    with pytest.raises(ValueError, match="integer labels"):
        loss.forward(logits, as_backend(backend, np.array([0.0, 1.0, 3.0], np.float32)))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\), got \(2,\)"):
        loss.forward(logits, as_backend(backend, np.array([0, 1])))
    with pytest.raises(ValueError, match=r"logits of shape \(N, K\), got \(3, 10, 1\)"):
        loss.forward(as_backend(backend, np.zeros((3, 10, 1), np.float32)), as_backend(backend, np.array([0, 1, 2])))
    with pytest.raises(ValueError, match="empty batch"):
        loss.forward(as_backend(backend, np.zeros((0, 10), np.float32)), as_backend(backend, np.zeros(0, np.int64)))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "int64"])
def test_loss_takes_labels_of_any_integer_dtype(backend, dtype):
    """torch takes uint8 indices for a mask and refuses int8 and int16 ones: the loss and gradient are int64's."""
    logits = as_backend(backend, np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32))
    labels = np.array([3, 0, 9, 3])
    loss = nn.CrossEntropyLoss()
    expected = float(loss.forward(logits, as_backend(backend, labels))), to_host(loss.backward())
    assert float(loss.forward(logits, as_backend(backend, labels.astype(dtype)))) == expected[0]
    assert np.array_equal(to_host(loss.backward()), expected[1])


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_unchecked_labels_out_of_range_behave_as_documented(name):
    """check_labels=False on NumPy and torch: a label >= K is an IndexError, -1 counts from the end (class K-1)."""
    pytest.importorskip(name)
    backend = get_backend(name, "cpu")
    loss = nn.CrossEntropyLoss(check_labels=False)
    logits = as_backend(backend, np.random.default_rng(0).standard_normal((2, 10)))
    wrapped = float(loss.forward(logits, as_backend(backend, np.array([-1, 2]))))
    assert wrapped == float(loss.forward(logits, as_backend(backend, np.array([9, 2]))))
    with pytest.raises(IndexError):
        loss.forward(logits, as_backend(backend, np.array([10, 2])))


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_an_empty_batch_gives_an_empty_result(backend, name):
    """Batch 0, as in PyTorch: evaluation gives (0, 10), training's backward the input's shape and zero gradients;
    batch norm refuses to train on no values, with its own error."""
    model = models.build(name, seed=0).to(backend)
    x = as_backend(backend, np.zeros((0, 1, 28, 28), np.float32))
    assert tuple(model.eval().forward(x).shape) == (0, 10)
    model.train()
    if any(isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d) for layer in model.modules()):
        with pytest.raises(ValueError, match="training needs more than one value per channel, got input \\(0, "):
            model.forward(x)
        return
    assert tuple(model.forward(x).shape) == (0, 10)
    assert tuple(model.backward(as_backend(backend, np.zeros((0, 10), np.float32))).shape) == (0, 1, 28, 28)
    assert all(not np.any(to_host(grad)) for _, grad in model.named_gradients())


def test_mixed_backends_raise_a_clear_error():
    pytest.importorskip("array_api_strict")
    conv = nn.Conv2d(1, 2, 3).to(get_backend("array-api-strict"))
    with pytest.raises(ValueError, match=r"move the model with \.to\(backend\)"):
        conv.forward(np.zeros((1, 1, 5, 5), np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="Conv2d: channels, kernel_size and stride must be >= 1"):
        nn.Conv2d(1, 2, 3, stride=0)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        nn.MaxPool2d((2, 2, 2))
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair of ints, got 3\.0"):
        nn.Conv2d(1, 8, 3.0)
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints, got \(2, 1\.5\)"):
        nn.MaxPool2d(2, (2, 1.5))
    with pytest.raises(ValueError, match=r"Conv2d: channels, kernel_size and stride must be >= 1 .*got 0, 8, 3"):
        nn.Conv2d(0, 8, 3)
    with pytest.raises(ValueError, match="Linear: in_features and out_features must be >= 1, got 0, 5"):
        nn.Linear(0, 5)
    with pytest.raises(ValueError, match="BatchNorm2d: num_features must be >= 1"):
        nn.BatchNorm2d(0)
    with pytest.raises(ValueError, match="BatchNorm1d: num_features must be >= 1"):
        nn.BatchNorm1d(-1)


def test_sizes_may_be_numpy_integers_and_a_backend_may_be_named():
    conv = nn.Conv2d(1, 8, np.int64(3), stride=(np.int32(2), 1), padding=np.int64(1))
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 1) and conv.padding == (1, 1)
    assert all(type(size) is int for size in (*conv.kernel_size, *conv.stride, *conv.padding))
    assert nn.MaxPool2d(np.int64(2)).stride == (2, 2)
    model = models.build("seed", seed=0)
    for name in ("numpy", "cpu"):
        assert all(isinstance(p, np.ndarray) for p in model.to(name).parameters())
    torch = pytest.importorskip("torch")
    assert all(isinstance(p, torch.Tensor) for p in model.to("torch").parameters())
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\)"):
        nn.Dropout(1.0)


def test_maxpool_gives_tied_gradient_to_the_first_maximum_only(backend):
    x = np.array([[[[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 0.0, 3.0]]]], np.float32)  # (1, 1, 2, 4): two 2x2 windows
    pool = nn.MaxPool2d(2).to(backend)
    y = pool.forward(as_backend(backend, x))
    assert to_host(y).tolist() == [[[[3.0, 3.0]]]]
    grad = to_host(pool.backward(as_backend(backend, np.array([[[[10.0, 20.0]]]], np.float32))))
    assert grad.tolist() == [[[[0.0, 10.0, 20.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]]


def test_backward_before_forward_is_an_error(backend):
    conv = nn.Conv2d(1, 2, 3).to(backend)
    with pytest.raises(RuntimeError, match="needs a forward"):
        conv.backward(as_backend(backend, np.zeros((1, 2, 3, 3), np.float32)))
    conv.eval().forward(as_backend(backend, np.zeros((1, 1, 5, 5), np.float32)))
    with pytest.raises(RuntimeError, match="training mode"):
        conv.backward(as_backend(backend, np.zeros((1, 2, 3, 3), np.float32)))


def test_dropout_modes(backend):
    drop = nn.Dropout(0.25)
    drop.set_generator(backend.generator(0))
    x = as_backend(backend, np.ones((200, 100), np.float32))
    y = to_host(drop.forward(x))
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    assert np.allclose(y[kept], 1 / 0.75)
    grad = to_host(drop.backward(x))
    assert np.array_equal(grad, y)
    drop.eval()
    assert np.array_equal(to_host(drop.forward(x)), np.ones((200, 100)))


def test_dropout_is_reproducible_for_a_seed(backend):
    x = as_backend(backend, np.ones((4, 50), np.float32))
    masks = []
    for _ in range(2):
        drop = nn.Dropout(0.5)
        drop.set_generator(backend.generator(3, 1))
        masks.append(to_host(drop.forward(x)))
    assert np.array_equal(*masks)


def test_params_are_assignable(backend):
    linear = nn.Linear(3, 2)
    linear.params["weight"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    linear.params["bias"] = np.array([1.0, -1.0], np.float32)
    linear.to(backend)
    y = to_host(linear.forward(as_backend(backend, np.array([[1.0, 0.0, 2.0]], np.float32))))
    assert y.tolist() == [[5.0, 12.0]]


def resnet_parameters(width: int) -> int:
    """resnet_small's parameters: the stem, a block of two width-channel convolutions, width -> 2*width, a block of two
    2*width-channel ones (each convolution with its batch norm's two vectors), the head."""
    wide = 2 * width
    stem = width * 9 + 2 * width
    return (
        stem
        + 2 * (width * width * 9 + 2 * width)
        + wide * width * 9
        + 2 * wide
        + 2 * (wide * wide * 9 + 2 * wide)
        + wide * 49 * 10
        + 10
    )


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("seed", 8 * 16 + 8 + 288 * 10 + 10),
        ("lenet", 6 * 25 + 6 + 16 * 6 * 25 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10),
        ("lenet-bn", 16 * 25 + 2 * 16 + 32 * 16 * 25 + 2 * 32 + 512 * 10 + 10),
        ("convnet", 32 * 9 + 32 + 64 * 32 * 9 + 64 + 1600 * 10 + 10),
        ("widenet", 32 * 9 + 2 * 32 + 64 * 32 * 9 + 2 * 64 + 128 * 64 * 9 + 2 * 128 + 4608 * 10 + 10),
        ("resnet-small", resnet_parameters(32)),
        ("resnet-wide", resnet_parameters(48)),
    ],
)
def test_named_models(backend, name, parameters):
    model = models.build(name, seed=1).to(backend)
    assert model.num_parameters() == parameters
    y = model.forward(as_backend(backend, np.random.default_rng(0).random((3, 1, 28, 28), np.float32)))
    assert tuple(y.shape) == (3, 10)
    assert str(y.dtype).endswith("float32")


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (models.build("convnet", seed=s).state_dict() for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet': expected one of seed, lenet, lenet-bn, convnet"):
        models.build("resnet")


def test_state_dict_round_trip_across_backends(backend):
    source = models.build("lenet", seed=3)
    target = models.build("lenet", seed=4).to(backend)
    target.load_state_dict(source.state_dict())
    state = target.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert all(np.array_equal(state[k], v) for k, v in source.state_dict().items())


def test_load_state_dict_rejects_mismatches():
    model = models.build("seed")
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "4.bias"})
    with pytest.raises(ValueError, match=r"0.weight has shape \(8, 1, 3, 3\), expected \(8, 1, 4, 4\)"):
        model.load_state_dict({**state, "0.weight": np.zeros((8, 1, 3, 3), np.float32)})


def test_load_state_dict_refuses_negative_running_variances():
    model = models.build("lenet-bn")
    state = model.state_dict()
    key = next(k for k in state if k.endswith("running_var"))
    damaged = state[key].copy()
    damaged[0] = -1.0
    with pytest.raises(ValueError, match=rf"{key} holds negative variances"):
        model.load_state_dict({**state, key: damaged})
    model.load_state_dict({**state, key: np.zeros_like(damaged)})  # a dead channel's zero variance is fine


def test_numpy_and_strict_agree_on_a_training_step():
    """The same weights and data give the same loss and gradients on both CPU backends.

    In float64: NumPy's fast path sums the convolutions in another order, and in float32 that
    can flip the winner of a near-tie in max-pooling.
    """
    pytest.importorskip("array_api_strict")
    x = np.random.default_rng(0).random((4, 1, 28, 28))
    labels = np.array([1, 2, 3, 4])
    results = []
    for name in ("numpy", "array-api-strict"):
        backend = get_backend(name)
        model = models.build("convnet", seed=0).to(backend, backend.xp.float64)
        model.set_generator(backend.generator(9))
        loss = nn.CrossEntropyLoss()
        value = loss.forward(model.forward(backend.asarray(x)), backend.asarray(labels))
        model.backward(loss.backward())
        results.append((float(value), {k: to_host(g) for k, g in model.named_gradients()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for key in grads_a:
        np.testing.assert_allclose(grads_a[key], grads_b[key], rtol=1e-10, atol=1e-14)


def test_pool_then_relu_equals_relu_then_pool(backend):
    """The named models pool before the ReLU; forward values and input gradients are identical, ties included."""
    x = np.round(np.random.default_rng(0).standard_normal((3, 4, 9, 9)) * 2) / 2  # many ties, zeros included
    grad = np.random.default_rng(1).standard_normal((3, 4, 3, 3))
    results = []
    for order in ((nn.ReLU(), nn.MaxPool2d(3)), (nn.MaxPool2d(3), nn.ReLU())):
        model = nn.Sequential(*order).to(backend, backend.xp.float64)
        y = model.forward(as_backend(backend, x))
        results.append((to_host(y), to_host(model.backward(as_backend(backend, grad)))))
    (y_a, g_a), (y_b, g_b) = results
    assert np.array_equal(y_a, y_b) and np.array_equal(g_a, g_b)


def test_recalibrate_batchnorm_averages_the_statistics_over_all_batches(backend):
    """Running statistics become size-weighted averages over the batches; dropout stays off."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 3, 4, 4)) * np.array([1.0, 2.0, 0.5])[None, :, None, None] + 1.5
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(48))
    model.to(backend, backend.xp.float64)
    for layer in (model[1], model[4]):  # what came before does not matter, not even a diverged run's NaN
        layer.buffers["running_mean"] = backend.asarray(np.full(layer.num_features, np.nan))
    batches = [x[:4], x[4:8], x[8:]]  # unequal sizes: 4, 4, 2
    nn.recalibrate_batchnorm(model, (backend.asarray(b) for b in batches))

    channels = np.moveaxis(x, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(to_host(model[1].buffers["running_mean"]), channels.mean(axis=0), rtol=1e-12)
    per_batch = [np.moveaxis(b, 1, -1).reshape(-1, 3).var(axis=0, ddof=1) * len(b) for b in batches]
    np.testing.assert_allclose(to_host(model[1].buffers["running_var"]), sum(per_batch) / 10, rtol=1e-12)
    # The second layer sees the first one's output normalised with each batch's own statistics, as in training.
    hidden = []
    for b in batches:
        mean, var = b.mean(axis=(0, 2, 3), keepdims=True), b.var(axis=(0, 2, 3), keepdims=True)
        hidden.append(np.maximum((b - mean) / np.sqrt(var + 1e-5), 0).reshape(len(b), -1))
    expected = sum(h.sum(axis=0) for h in hidden) / 10
    np.testing.assert_allclose(to_host(model[4].buffers["running_mean"]), expected, rtol=1e-9)
    assert not model.training and not any(layer.training for layer in model)
    assert model[1].momentum == model[4].momentum == 0.1


def test_recalibrate_batchnorm_reaches_the_layers_of_nested_containers(backend):
    """A batch-norm layer inside a nested Sequential is recalibrated as the same layer in a flat model."""
    x = np.random.default_rng(6).normal(size=(8, 2, 3, 3)) * 3.0 - 1.0
    flat = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(18))
    nested = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(18)))
    for model in (flat, nested):
        model.to(backend, backend.xp.float64)
        nn.recalibrate_batchnorm(model, (backend.asarray(b) for b in (x[:5], x[5:])))
    nested_buffers = dict(nested.named_buffers())
    assert len(nested_buffers) == 4
    for (_, expected), (name, got) in zip(flat.named_buffers(), nested_buffers.items(), strict=True):
        np.testing.assert_allclose(to_host(got), to_host(expected), rtol=1e-12, err_msg=name)


def test_sequential_updates_every_batchnorm_layers_running_statistics_as_pytorch(backend):
    """One fused update at the end of the forward pass: per layer (1 - m) * running + m * batch, variance unbiased."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 2, 3, 3)) * 2.0 + 0.5
    model = nn.Sequential(nn.BatchNorm2d(2, momentum=0.3), nn.Flatten(), nn.BatchNorm1d(18, momentum=0.05))
    model.to(backend, backend.xp.float64)
    before = {name: rng.uniform(0.5, 2.0, size=tuple(v.shape)) for name, v in model.named_buffers()}
    model.set_buffers({name: backend.asarray(v) for name, v in before.items()})
    model.forward(as_backend(backend, x))

    first = np.moveaxis(x, 1, -1).reshape(-1, 2)
    normalised = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    second = normalised.reshape(5, -1)
    expected = {
        "0.running_mean": 0.7 * before["0.running_mean"] + 0.3 * first.mean(axis=0),
        "0.running_var": 0.7 * before["0.running_var"] + 0.3 * first.var(axis=0, ddof=1),
        "2.running_mean": 0.95 * before["2.running_mean"] + 0.05 * second.mean(axis=0),
        "2.running_var": 0.95 * before["2.running_var"] + 0.05 * second.var(axis=0, ddof=1),
    }
    for name, value in model.named_buffers():
        np.testing.assert_allclose(to_host(value), expected[name], rtol=1e-12, err_msg=name)
    # The same as each layer's own forward pass, which updates only its own statistics.
    alone = nn.BatchNorm2d(2, momentum=0.3).to(backend, backend.xp.float64)
    alone.set_buffers({name[2:]: backend.asarray(before[name]) for name in ("0.running_mean", "0.running_var")})
    alone.forward(as_backend(backend, x))
    for name, value in alone.named_buffers():
        np.testing.assert_allclose(to_host(value), expected[f"0.{name}"], rtol=1e-12, err_msg=name)


def test_moving_averages_are_one_update_for_any_number_of_pairs(backend):
    from xpcnn import functional as F

    rng = np.random.default_rng(5)
    averages, values = [rng.normal(size=n) for n in (3, 1, 4)], [rng.normal(size=n) for n in (3, 1, 4)]
    weights = ((0.1, 1.0), (0.5, 2.0), (1.0, 1.5))
    got = F.moving_averages(
        [as_backend(backend, a) for a in averages], [as_backend(backend, v) for v in values], weights
    )
    for result, average, value, (m, s) in zip(got, averages, values, weights, strict=True):
        np.testing.assert_allclose(to_host(result), (1 - m) * average + m * s * value, rtol=1e-15, atol=1e-15)


def test_recalibrate_without_batchnorm_reads_nothing():
    model = models.build("convnet", seed=0)
    before = model.state_dict()

    def batches():
        raise AssertionError("no batch-norm layer: nothing to read")
        yield

    nn.recalibrate_batchnorm(model, batches())
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())


# --- global average pooling and residual blocks ---


def test_global_avgpool_is_the_mean_of_each_map_and_spreads_the_gradient_evenly(backend):
    x = np.arange(2 * 3 * 2 * 4, dtype=np.float64).reshape(2, 3, 2, 4)
    pool = nn.GlobalAvgPool2d()
    y = pool.forward(as_backend(backend, x))
    np.testing.assert_array_equal(to_host(y), x.mean(axis=(2, 3)))
    grad = np.array([[8.0, -16.0, 4.0], [0.0, 1.0, 2.0]])
    expected = np.broadcast_to(grad[:, :, None, None] / 8, x.shape)
    np.testing.assert_array_equal(to_host(pool.backward(as_backend(backend, grad))), expected)
    pool.eval().forward(as_backend(backend, x))
    with pytest.raises(RuntimeError, match="training mode"):
        pool.backward(as_backend(backend, grad))


def test_residual_adds_the_shortcut_to_the_branch(backend):
    """Identity: x + branch(x); with a projection: projection(x) + branch(x); the gradient is the sum of both paths'."""
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4))
    for case in ("identity", "projection"):
        block = residual_block(case).to(backend, backend.xp.float64)
        shortcut = (lambda v: v) if block.projection is None else block.projection.forward
        expected = to_host(block.branch.forward(as_backend(backend, x))) + to_host(shortcut(as_backend(backend, x)))
        y = block.forward(as_backend(backend, x))
        np.testing.assert_allclose(to_host(y), expected, rtol=1e-14)
        grad_y = np.random.default_rng(1).standard_normal(tuple(y.shape))
        grad_x = to_host(block.backward(as_backend(backend, grad_y)))
        branch = to_host(block.branch.backward(as_backend(backend, grad_y)))
        other = grad_y if block.projection is None else to_host(block.projection.backward(as_backend(backend, grad_y)))
        np.testing.assert_allclose(grad_x, branch + other, rtol=1e-14)


def test_residual_names_its_paths_as_pytorch_and_behaves_as_a_container(backend):
    block = nn.Residual(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=0), nn.BatchNorm2d(3), nn.Dropout(0.5)),
        nn.Conv2d(2, 3, 1, rng=1),
    )
    assert [name for name, _ in block.named_parameters()] == [
        "branch.0.weight",
        "branch.0.bias",
        "branch.1.weight",
        "branch.1.bias",
        "projection.weight",
        "projection.bias",
    ]
    assert [name for name, _ in block.named_buffers()] == ["branch.1.running_mean", "branch.1.running_var"]
    assert [name for name, _ in block.named_children()] == ["branch", "projection"]
    assert [type(m).__name__ for m in block.modules()] == [
        "Residual",
        "Sequential",
        "Conv2d",
        "BatchNorm2d",
        "Dropout",
        "Conv2d",
    ]
    assert repr(block) == (
        "Residual(Sequential(Conv2d(2, 3, kernel_size=(3, 3), padding=(1, 1)), BatchNorm2d(3, eps=1e-05, "
        "momentum=0.1), Dropout(p=0.5)), projection=Conv2d(2, 3, kernel_size=(1, 1)))"
    )
    block.to(backend, backend.xp.float64)
    arrays = [*block.parameters(), *dict(block.named_buffers()).values()]
    assert all(value.dtype == backend.xp.float64 for value in arrays)
    assert {type(value) for value in arrays} == {type(as_backend(backend, np.zeros(1)))}
    assert block.num_parameters() == 3 * 2 * 9 + 3 + 3 + 3 + 3 * 2 + 3
    # modes, the generator and the communicator reach every layer in either path
    assert not any(m.training for m in block.eval().modules())
    assert all(m.training for m in block.train().modules())
    block.set_generator(generator := backend.generator(3))
    assert block.branch[2].generator is generator
    ranks = types.SimpleNamespace(world_size=2)
    block.set_communicator(ranks)
    assert block.branch[1].communicator is ranks
    block.set_communicator(None)
    # parameters, buffers and gradients assigned by name, then read back by name
    x = as_backend(backend, np.random.default_rng(2).standard_normal((2, 2, 4, 4)))
    block.forward(x)
    block.backward(as_backend(backend, np.ones((2, 3, 4, 4))), input_grad=False)
    assert [name for name, _ in block.named_gradients()] == [name for name, _ in block.named_parameters()]
    block.zero_grad()
    assert list(block.named_gradients()) == []
    new = {name: as_backend(backend, np.full(tuple(v.shape), 0.5)) for name, v in block.named_parameters()}
    block.set_parameters(new)
    assert block.projection.params["weight"] is new["projection.weight"]
    block.set_buffers({"branch.1.running_var": as_backend(backend, np.full(3, 4.0))})
    assert to_host(block.branch[1].buffers["running_var"]).tolist() == [4.0] * 3
    block.zero_cache()
    assert all(getattr(m, "_cache", None) is None for m in block.modules())
    with pytest.raises(RuntimeError, match="needs a forward"):
        block.backward(as_backend(backend, np.ones((2, 3, 4, 4))))


def test_residual_summary_and_output_shapes(backend):
    block = residual_block("batch-norm").to(backend)
    assert block.output_shapes((2, 6, 6)) == [(1, 4, 3, 3), (1, 4, 3, 3)]
    lines = block.summary(input_shape=(2, 6, 6)).splitlines()
    assert lines[2].split()[:2] == ["branch", "Sequential(5"] and lines[2].endswith(f" {block.branch.num_parameters()}")
    assert lines[3].startswith("projection  Sequential(2 layers)")
    model = small_resnet().to(backend)
    model.train()
    model[5].eval()  # one block's mode of its own: put back as it was, not as its container's
    text = model.summary(input_shape=(1, 28, 28))
    assert re.search(
        r"^5  Residual\(Sequential\(5 layers\), projection=Sequential\(2 layers\)\) +\(None, 16, 7, 7\)", text, re.M
    )
    assert "GlobalAvgPool2d()" in text and "(None, 16)" in text
    assert model.training and not any(m.training for m in model[5].modules())
    assert all(m.training for m in model[3].modules())
    assert model.output_shapes((1, 28, 28))[-2:] == [(1, 16), (1, 10)]


def test_residual_shapes_that_do_not_add_up_are_an_error_naming_both(backend):
    block = nn.Residual(nn.Conv2d(2, 4, 3, padding=1, rng=0)).to(backend)
    with pytest.raises(
        ValueError,
        match=r"Residual: the branch gives \(1, 4, 5, 5\) but the identity shortcut gives "
        r"\(1, 2, 5, 5\) for input \(1, 2, 5, 5\): give a projection",
    ):
        block.forward(as_backend(backend, np.zeros((1, 2, 5, 5), np.float32)))
    strided = nn.Residual(nn.Conv2d(2, 4, 3, stride=2, padding=1, rng=0), nn.Conv2d(2, 4, 1, rng=1)).to(backend)
    with pytest.raises(ValueError, match=r"the branch gives \(1, 4, 3, 3\) but the projection gives \(1, 4, 5, 5\)"):
        strided.forward(as_backend(backend, np.zeros((1, 2, 5, 5), np.float32)))


def test_residual_state_dict_round_trip_and_mismatches(backend):
    source, target = small_resnet(seed=1), small_resnet(seed=2).to(backend)
    target.load_state_dict(source.state_dict())
    assert all(np.array_equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    state = source.state_dict()
    with pytest.raises(ValueError, match=r"missing \['5.projection.0.weight'\]"):
        target.load_state_dict({k: v for k, v in state.items() if k != "5.projection.0.weight"})


def test_a_lent_resnet_runs_on_given_state_and_comes_back_untouched(backend):
    """The stateless core on nested containers: gradients of given parameters equal the model's own, and
    neither the parameters, the buffers nor any cache of the model change."""
    model = small_resnet(seed=4).to(backend, backend.xp.float64)
    x = as_backend(backend, np.random.default_rng(5).standard_normal((4, 1, 28, 28)))
    y = as_backend(backend, np.array([0, 3, 5, 9]))
    before = model.state_dict()
    parameters = {k: as_backend(backend, v * 0.5) for k, v in before.items() if "running" not in k}
    buffers = dict(model.named_buffers())
    loss, _, grads, new_buffers = step.stateless_gradients(
        model, nn.CrossEntropyLoss(), parameters, buffers, x, y, backend.generator(0)
    )
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(getattr(m, "_cache", None) is None for m in model.modules())
    assert list(model.named_gradients()) == []
    assert new_buffers.keys() == buffers.keys()
    assert not np.array_equal(to_host(new_buffers["3.branch.1.running_mean"]), before["3.branch.1.running_mean"])
    model.set_parameters(parameters)
    loss_fn = nn.CrossEntropyLoss()
    expected = loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward(), input_grad=False)
    assert float(loss) == pytest.approx(float(expected), rel=1e-14)
    assert grads.keys() == dict(model.named_gradients()).keys()
    for name, grad in model.named_gradients():
        np.testing.assert_allclose(to_host(grads[name]), to_host(grad), rtol=1e-13, atol=1e-15, err_msg=name)


def test_a_layer_used_twice_is_refused_not_given_wrong_gradients():
    """The second use overwrote the layer's cache, so the first use's backward read the wrong input."""
    linear = nn.Linear(3, 3, rng=0)
    with pytest.raises(ValueError, match=r"^Linear\(3, 3\) is used twice in the model: give each place a layer"):
        nn.Sequential(linear, nn.ReLU(), linear)
    relu = nn.ReLU()
    with pytest.raises(ValueError, match=r"^ReLU\(\) is used twice"):
        nn.Sequential(nn.Residual(nn.Sequential(nn.Linear(3, 3, rng=1), relu)), relu)
    block = nn.Sequential(nn.Linear(3, 3, rng=2))
    with pytest.raises(ValueError, match="is used twice"):
        nn.Residual(block, block)


def test_recalibrate_batchnorm_without_batches_or_with_a_failing_one_leaves_the_statistics(backend):
    model = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2, rng=1))
    model.to(backend)
    x = as_backend(backend, np.random.default_rng(0).normal(2.0, 3.0, (33, 4)).astype(np.float32))
    model(x)  # running statistics that are not the initial zeros and ones
    before = {name: to_host(value) for name, value in model.named_buffers()}
    with pytest.raises(ValueError, match="recalibrate_batchnorm: no batches"):
        nn.recalibrate_batchnorm(model, [])
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.recalibrate_batchnorm(
            model, (x[i : min(i + 16, 33), :] for i in range(0, 33, 16))
        )  # the last batch holds one image
    for name, value in model.named_buffers():
        np.testing.assert_array_equal(to_host(value), before[name])
    assert model[1].momentum == 0.1 and not model.training


def test_dropout_backward_uses_its_forwards_mask_after_a_mode_change(backend):
    dropout = nn.Dropout(0.5).to(backend)
    dropout.set_generator(backend.generator(0))
    x = as_backend(backend, np.ones((4, 6), np.float32))
    mask = to_host(dropout(x))  # the scaled mask, since x is ones
    dropout.eval()
    np.testing.assert_array_equal(to_host(dropout.backward(x)), mask)
    assert set(np.unique(mask)) == {0.0, 2.0}
    dropout(x)  # an evaluation forward is the identity, and so is its backward
    np.testing.assert_array_equal(to_host(dropout.backward(x)), np.ones((4, 6)))


def test_a_model_moved_after_a_training_forward_trains_on_its_new_backend():
    """Dropout's generator stayed on the old backend: the next training forward mixed two libraries."""
    strict = get_backend("array-api-strict")
    model = models.build("convnet")
    model(np.zeros((2, 1, 28, 28), np.float32))
    model.to(strict)
    y = model(strict.asarray(np.zeros((2, 1, 28, 28), np.float32)))
    assert type(y).__module__.startswith("array_api_strict")


def test_a_failed_forward_leaves_no_stale_cache_for_backward():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3, rng=1))
    model(np.zeros((2, 1, 6, 6), np.float32))
    with pytest.raises(ValueError, match="expected input of shape"):
        model(np.zeros((2, 1, 7, 7), np.float32))
    with pytest.raises(RuntimeError, match=r"Linear\(32, 3\): backward\(\) needs a forward\(\) in training mode first"):
        model.backward(np.ones((2, 3), np.float32))


def test_mixed_libraries_and_pytorchs_cumulative_momentum_are_clear_errors():
    strict = get_backend("array-api-strict")
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(
        ValueError,
        match=r"CrossEntropyLoss: logits \(numpy.ndarray\) and labels \(array_api_strict.*must be arrays of one",
    ):
        nn.CrossEntropyLoss()(logits, strict.asarray(np.array([0, 1])))
    with pytest.raises(ValueError, match="momentum a number in"):
        nn.BatchNorm2d(3, momentum=None)


def test_batch_statistics_of_rows_that_are_mostly_one_value_are_float32_exact(backend):
    """A blank background is most of MNIST's pixels. Summed a row at a time in float32 (NumPy's and
    array-api-strict's sums down a column, XLA's CPU loops under xpcnn's compiler options) their mean was 3e-5
    off, a bias that training compounded: compiled JAX ended 4% from eager after 20 steps."""
    from xpcnn import functional as F

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, (32, 16, 12, 12))
    x = np.where(rng.random(x.shape) < 0.7, 0.3, x).astype(np.float32)
    rows = np.moveaxis(x, 1, -1).reshape(-1, 16).astype(np.float64)
    args = [backend.asarray(a) for a in (x, np.ones(16, np.float32), np.zeros(16, np.float32))]

    def statistics(x, weight, bias):
        _, _, _, mean, var = F.batchnorm_forward(x, weight, bias, 1e-5)
        return mean, var

    results = [statistics(*args)]
    if backend.name == "jax":  # also compiled, as training's step programs are
        import jax

        from xpcnn.ops.fastpath_jax import compiler_options

        options = compiler_options(next(iter(args[0].devices())))
        results.append(jax.jit(statistics).lower(*args).compile(compiler_options=options)(*args))
    for mean, var in results:
        np.testing.assert_allclose(to_host(mean), rows.mean(axis=0), rtol=2e-6)
        np.testing.assert_allclose(to_host(var), rows.var(axis=0), rtol=2e-6)
