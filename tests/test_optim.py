"""Optimiser steps against the textbook formulas (and torch.optim where torch is installed)."""

import numpy as np
import pytest

from xpcnn import nn, optim
from xpcnn.backend import get_backend, to_host

STEPS = 4


def gradient_sequence():
    rng = np.random.default_rng(0)
    return [{"0.weight": rng.standard_normal((3, 4)), "0.bias": rng.standard_normal(3)} for _ in range(STEPS)]


def initial_params():
    rng = np.random.default_rng(1)
    return {"0.weight": rng.standard_normal((3, 4)), "0.bias": rng.standard_normal(3)}


def run_xpcnn(backend, make_optimizer):
    """Apply the fixed gradient sequence with xpcnn's optimiser; return host float64 parameters."""
    model = nn.Sequential(nn.Linear(4, 3))
    model.set_parameters(initial_params())
    model.to(backend, backend.xp.float64)
    opt = make_optimizer(model)
    for grads in gradient_sequence():
        for key, g in grads.items():
            index, name = key.split(".")
            model[int(index)].grads[name] = backend.asarray(g)
        opt.step()
    return {k: to_host(v) for k, v in model.parameters().items()}


def sgd_reference(lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    params, velocity = initial_params(), {}
    for grads in gradient_sequence():
        for k, p in params.items():
            g = grads[k] + weight_decay * p
            if momentum:
                velocity[k] = g if k not in velocity else momentum * velocity[k] + g
                g = g + momentum * velocity[k] if nesterov else velocity[k]
            params[k] = p - lr * g
    return params


def adam_reference(lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    params = initial_params()
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(gradient_sequence(), start=1):
        for k, p in params.items():
            g = grads[k]
            if decoupled:
                p = p - lr * weight_decay * p
            else:
                g = g + weight_decay * p
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g * g
            m_hat = m[k] / (1 - beta1**t)
            v_hat = v[k] / (1 - beta2**t)
            params[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


CASES = {
    "sgd": (lambda m: optim.SGD(m, lr=0.1), lambda: sgd_reference(0.1)),
    "momentum": (lambda m: optim.SGD(m, lr=0.1, momentum=0.9), lambda: sgd_reference(0.1, 0.9)),
    "nesterov+wd": (
        lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda: sgd_reference(0.05, 0.8, True, 0.01),
    ),
    "adam": (lambda m: optim.Adam(m, lr=0.01), lambda: adam_reference(0.01, 0.9, 0.999, 1e-8)),
    "adam+l2": (
        lambda m: optim.Adam(m, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
        lambda: adam_reference(0.01, 0.8, 0.99, 1e-8, 0.1),
    ),
    "adamw": (
        lambda m: optim.AdamW(m, lr=0.01, weight_decay=0.1),
        lambda: adam_reference(0.01, 0.9, 0.999, 1e-8, 0.1, decoupled=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_textbook_formula(backend, case):
    make_optimizer, reference = CASES[case]
    got, expected = run_xpcnn(backend, make_optimizer), reference()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=1e-14)
        assert not np.allclose(got[key], initial_params()[key])


TORCH_CASES = {
    "momentum": (lambda m: optim.SGD(m, lr=0.1, momentum=0.9), lambda p: ("SGD", dict(lr=0.1, momentum=0.9))),
    "nesterov+wd": (
        lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda p: ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ),
    "adam+l2": (
        lambda m: optim.Adam(m, lr=0.01, weight_decay=0.1),
        lambda p: ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ),
    "adamw": (
        lambda m: optim.AdamW(m, lr=0.01, weight_decay=0.1),
        lambda p: ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_optimizer_matches_torch(backend, case):
    torch = pytest.importorskip("torch")
    make_optimizer, torch_spec = TORCH_CASES[case]
    got = run_xpcnn(backend, make_optimizer)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in initial_params().items()}
    name, kwargs = torch_spec(tparams)
    topt = getattr(torch.optim, name)(list(tparams.values()), **kwargs)
    for grads in gradient_sequence():
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
    for key, t in tparams.items():
        np.testing.assert_allclose(got[key], t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_identically(backend):
    def fresh():
        model = nn.Sequential(nn.Linear(4, 3))
        model.set_parameters(initial_params())
        return model.to(backend, backend.xp.float64)

    grads = gradient_sequence()

    def apply(model, opt, steps):
        for g in steps:
            for key, value in g.items():
                model[0].grads[key.split(".")[1]] = backend.asarray(value)
            opt.step()

    straight = fresh()
    opt = optim.Adam(straight, lr=0.01)
    apply(straight, opt, grads)

    first = fresh()
    opt_first = optim.Adam(first, lr=0.01)
    apply(first, opt_first, grads[:2])
    second = fresh()
    second.load_state_dict(first.state_dict())
    opt_second = optim.Adam(second, lr=0.5)
    opt_second.load_state_dict(opt_first.state_dict())
    assert opt_second.lr == 0.01 and opt_second.steps == 2
    apply(second, opt_second, grads[2:])
    for key, value in straight.parameters().items():
        assert np.array_equal(to_host(value), to_host(second.parameters()[key]))


def test_step_without_gradients_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no gradients for"):
        optim.SGD(model, lr=0.1).step()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: optim.SGD(m, lr=0), "lr must be > 0"),
        (lambda m: optim.SGD(m, lr=0.1, momentum=1.0), "momentum must be in"),
        (lambda m: optim.SGD(m, lr=0.1, nesterov=True), "nesterov needs momentum"),
        (lambda m: optim.Adam(m, betas=(0.9, 1.0)), "betas must be in"),
        (lambda m: optim.AdamW(m, weight_decay=-1), "weight_decay must be >= 0"),
    ],
)
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make(nn.Sequential(nn.Linear(2, 2)))


def test_adam_first_step_moves_each_weight_by_lr():
    """A property of the formula: the bias-corrected first step is lr * sign(g), up to eps."""
    model = nn.Sequential(nn.Linear(4, 3))
    model.set_parameters(initial_params())
    model.to(get_backend("numpy"), np.float64)
    first = gradient_sequence()[0]
    model[0].grads.update(weight=first["0.weight"], bias=first["0.bias"])
    optim.Adam(model, lr=0.01).step()
    moved = to_host(model[0].params["weight"]) - initial_params()["0.weight"]
    np.testing.assert_allclose(moved, -0.01 * np.sign(first["0.weight"]), rtol=1e-5)
