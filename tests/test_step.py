"""The stateless core (training/step.py): nested containers on every path, and steps that leave their inputs alone."""

import numpy as np
import pytest

import xpcnn
from xpcnn import nn, optim
from xpcnn.backends.backend import get_backend
from xpcnn.training.step import Step, lent, stateless_forward


def nested_model():
    """A Sequential inside a Sequential, with batch norm (buffers) and dropout (noise) inside the inner one."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, bias=False, rng=0), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(),
        nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * 13 * 13, 10, rng=1)),
    )


def digits(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


def assert_trained(before: dict, after: dict):
    assert sorted(after) == sorted(before)
    assert not np.array_equal(after["0.0.weight"], before["0.0.weight"])  # the inner layers trained
    assert not np.array_equal(after["0.2.running_mean"], before["0.2.running_mean"])  # and their buffers moved
    assert not np.array_equal(after["2.1.weight"], before["2.1.weight"])


def test_fit_trains_a_nested_sequential(backend):
    """On every backend, JAX's compiled step included (it raised AttributeError on a nested Sequential)."""
    model = nested_model()
    before = model.state_dict()
    history = xpcnn.fit(model, digits(), backend=backend, epochs=1, batch_size=32)
    assert np.isfinite(history.records[0]["train_loss"])
    assert_trained(before, model.state_dict())


def test_jax_eager_steps_train_a_nested_sequential():
    """The uncompiled JAX runner (--eager) runs the same step on a nested Sequential."""
    pytest.importorskip("jax")
    from xpcnn.training.compiled import CompiledSteps

    backend = get_backend("jax", "cpu")
    model = nested_model().to(backend)
    before = model.state_dict()
    optimizer = optim.SGD(model, lr=0.1, momentum=0.9)
    steps = CompiledSteps(model, nn.CrossEntropyLoss(check_labels=False), optimizer, backend, seed=0, compile=False)
    images, labels = digits(64)
    images, labels = backend.asarray(images[:, None]), backend.asarray(labels)
    steps.start_epoch(0, 0)
    for step in range(2):
        steps.train_step(images, labels, backend.asarray(np.arange(32 * step, 32 * step + 32)), step)
    assert optimizer.steps == 2
    assert_trained(before, model.state_dict())


def test_one_rule_picks_the_runner_that_train_and_bench_run():
    """JAX runs CompiledSteps, compiled unless eager (--eager of train and bench alike); the other backends
    LayerSteps; and several JAX ranks refuse to run eagerly."""
    pytest.importorskip("jax")
    from xpcnn.backends.distributed import Communicator, DistributedError
    from xpcnn.training.compiled import CompiledSteps
    from xpcnn.training.train import LayerSteps, step_runner

    def runner(name, eager, communicator=None):
        backend = get_backend(name, "cpu")
        model = nested_model().to(backend)
        optimizer = optim.SGD(model, lr=0.1)
        return step_runner(model, nn.CrossEntropyLoss(), optimizer, backend, 0, eager=eager, communicator=communicator)

    assert type(runner("numpy", eager=True)) is LayerSteps
    compiled, eager = runner("jax", eager=False), runner("jax", eager=True)
    assert type(compiled) is type(eager) is CompiledSteps and compiled.compiles and not eager.compiles
    two_ranks = Communicator()
    two_ranks.world_size = 2
    with pytest.raises(DistributedError, match="on the jax backend runs compiled: leave out --eager"):
        runner("jax", eager=True, communicator=two_ranks)


def test_lent_restores_every_layer_of_nested_containers():
    model = nested_model()
    inner = model[0][2]
    kept = dict(vars(inner)), dict(inner.params), dict(inner.buffers)
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    with lent(model):
        model[0][2].params["weight"] = 2 * inner.params["weight"]
        model.forward(x)
    assert (dict(vars(inner)), inner.params, inner.buffers) == kept
    assert inner._cache is None and model[0].training


def test_a_training_step_returns_new_state_and_leaves_the_model_alone():
    """Step.train is a function of its arguments: the model and optimiser hold what they held before."""
    backend = get_backend("numpy")
    model = nested_model()
    optimizer = optim.SGD(model, lr=0.1, momentum=0.9)
    step = Step(model, nn.CrossEntropyLoss(), optimizer)
    images, labels = digits(8)
    state = step.state()
    flat_before = np.array(state.params)  # a copy: on NumPy the update writes into the flat buffer
    buffers_before = {k: np.array(v) for k, v in state.buffers.items()}
    new, metrics = step.train(
        state, images[:, None], labels, np.arange(8), backend.generator(0), optimizer.lr, optimizer.steps + 1
    )
    assert optimizer.steps == 0 and metrics.loss > 0 and 0 <= int(metrics.correct) <= 8
    assert not np.array_equal(new.params, flat_before) and set(new.slots) == {"momentum"}
    assert all(np.array_equal(v, buffers_before[k]) for k, v in model.named_buffers())
    assert not any(np.array_equal(new.buffers[k], v) for k, v in buffers_before.items())
    assert all(not layer.grads for _, layer in model._holders())


def test_the_evaluation_step_matches_the_model_in_evaluation_mode():
    model = nested_model()
    x = np.random.default_rng(1).random((5, 1, 28, 28)).astype(np.float32)
    logits, buffers = stateless_forward(model, dict(model.named_parameters()), dict(model.named_buffers()), x, False)
    assert model.training  # lent: the mode is the caller's again
    np.testing.assert_array_equal(logits, model.eval().forward(x))
    assert buffers.keys() == dict(model.named_buffers()).keys()
