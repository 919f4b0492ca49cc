"""Optimiser steps against the textbook formulas (and torch.optim where torch is installed)."""

import numpy as np
import pytest

from xpcnn import nn, optim
from xpcnn.backends.backend import get_backend, to_host

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
    return {k: to_host(v) for k, v in model.named_parameters()}


def sgd_reference(lr, momentum=0.0, nesterov=False, weight_decay=0.0, params=None, sequence=None):
    """Per-parameter SGD in float64 NumPy, from ``initial_params()`` and ``gradient_sequence()`` unless given."""
    params, velocity = dict(initial_params() if params is None else params), {}
    for grads in gradient_sequence() if sequence is None else sequence:
        for k, p in params.items():
            g = grads[k] + weight_decay * p
            if momentum:
                velocity[k] = g if k not in velocity else momentum * velocity[k] + g
                g = g + momentum * velocity[k] if nesterov else velocity[k]
            params[k] = p - lr * g
    return params


def adam_reference(lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False, params=None, sequence=None):
    """Per-parameter Adam(W) in float64 NumPy, from ``initial_params()`` and ``gradient_sequence()`` unless given."""
    params = dict(initial_params() if params is None else params)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(gradient_sequence() if sequence is None else sequence, start=1):
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


def fresh_model(backend, params=None, model=None):
    """``model`` (a one-layer Linear by default) with ``params`` (``initial_params()``) as float64 on ``backend``."""
    model = nn.Sequential(nn.Linear(4, 3)) if model is None else model
    model.set_parameters(initial_params() if params is None else params)
    return model.to(backend, backend.xp.float64)


def apply(backend, model, opt, sequence):
    """One optimiser step per gradient dict of ``sequence``."""
    for grads in sequence:
        for key, value in grads.items():
            index, name = key.split(".")
            model[int(index)].grads[name] = backend.asarray(value)
        opt.step()


def host_params(model):
    return {k: to_host(v) for k, v in model.named_parameters()}


ROUND_TRIP = {
    "adam": lambda m, lr: optim.Adam(m, lr=lr),
    "adamw": lambda m, lr: optim.AdamW(m, lr=lr, weight_decay=0.1),
    "nesterov+wd": lambda m, lr: optim.SGD(m, lr=lr, momentum=0.8, nesterov=True, weight_decay=0.01),
    "sgd+ema": lambda m, lr: optim.SGD(m, lr=lr, ema=0.9),
    "adamw+ema": lambda m, lr: optim.AdamW(m, lr=lr, weight_decay=0.1, ema=0.5),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_state_dict_round_trip_continues_identically(backend, case):
    make = ROUND_TRIP[case]
    grads = gradient_sequence()
    straight = fresh_model(backend)
    opt_straight = make(straight, 0.01)
    apply(backend, straight, opt_straight, grads)

    first = fresh_model(backend)
    opt_first = make(first, 0.01)
    apply(backend, first, opt_first, grads[:2])
    second = fresh_model(backend)
    second.load_state_dict(first.state_dict())
    opt_second = make(second, 0.5)
    opt_second.load_state_dict(opt_first.state_dict())
    assert opt_second.lr == 0.01 and opt_second.steps == 2
    apply(backend, second, opt_second, grads[2:])
    for key, value in host_params(straight).items():
        assert np.array_equal(value, host_params(second)[key])
    averaged = opt_second.averaged_parameters()
    for key, value in opt_straight.averaged_parameters().items():
        assert np.array_equal(to_host(value), to_host(averaged[key]))


def test_state_dict_keeps_the_per_parameter_format(backend):
    model = fresh_model(backend)
    opt = optim.Adam(model, lr=0.01)
    assert opt.state_dict() == {"steps": 0, "lr": 0.01, "state": {}} and opt.state == {}
    apply(backend, model, opt, gradient_sequence()[:2])
    saved = opt.state_dict()
    assert saved["steps"] == 2 and list(saved["state"]) == ["0.weight", "0.bias"]
    for name, param in initial_params().items():
        assert list(saved["state"][name]) == ["exp_avg", "exp_avg_sq"]
        for slot, value in saved["state"][name].items():
            assert isinstance(value, np.ndarray) and value.shape == param.shape and value.dtype == np.float64
            assert np.array_equal(value, to_host(opt.state[name][slot]))
    again = optim.Adam(fresh_model(backend), lr=0.5)
    again.load_state_dict(saved)
    reloaded = again.state_dict()
    assert reloaded["steps"] == 2 and reloaded["lr"] == 0.01
    for name, slots in saved["state"].items():
        assert all(np.array_equal(reloaded["state"][name][slot], value) for slot, value in slots.items())


def test_sgd_without_momentum_has_an_empty_entry_per_parameter(backend):
    model = fresh_model(backend)
    opt = optim.SGD(model, lr=0.1)
    apply(backend, model, opt, gradient_sequence()[:1])
    assert opt.state_dict()["state"] == {"0.weight": {}, "0.bias": {}}


def test_snapshots_do_not_follow_later_steps(backend):
    model = fresh_model(backend)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    apply(backend, model, opt, gradient_sequence()[:1])
    model_snapshot, opt_snapshot = model.state_dict(), opt.state_dict()
    copies = {k: v.copy() for k, v in model_snapshot.items()}, opt_snapshot["state"]["0.weight"]["momentum"].copy()
    apply(backend, model, opt, gradient_sequence()[1:])
    assert all(np.array_equal(v, model_snapshot[k]) for k, v in copies[0].items())
    assert np.array_equal(copies[1], opt_snapshot["state"]["0.weight"]["momentum"])


def test_parameters_are_views_that_follow_in_place_updates(backend, monkeypatch):
    """On NumPy, CuPy and torch a step writes into the flat buffer that the model's parameters view."""
    model = fresh_model(backend)
    opt = optim.SGD(model, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)
    sequence = gradient_sequence()
    apply(backend, model, opt, sequence[:1])
    installed = dict(model.named_parameters())
    if not optim.updates_in_place(installed["0.weight"]):
        pytest.skip(f"{backend.name}: functional updates")
    before = host_params(model)
    monkeypatch.setattr(opt, "_gather", lambda params: pytest.fail("gathered the parameters again"))
    apply(backend, model, opt, sequence[1:])
    assert all(dict(model.named_parameters())[k] is v for k, v in installed.items())
    expected = sgd_reference(0.05, 0.8, True, 0.01)
    for key, value in host_params(model).items():
        assert not np.array_equal(value, before[key])
        np.testing.assert_allclose(value, expected[key], rtol=1e-12, atol=1e-14)


def replace_with_set_parameters(backend, model, values):
    model.set_parameters({k: backend.asarray(v) for k, v in values.items()})


def replace_with_load_state_dict(backend, model, values):
    model.load_state_dict(values)


def replace_with_to(backend, model, values):
    """Same values (set with NumPy arrays), then moved by Layer.to: new arrays of the backend."""
    model.set_parameters(values)
    model.to(backend, backend.xp.float64)


REPLACE = {"set_parameters": replace_with_set_parameters, "load_state_dict": replace_with_load_state_dict}
REPLACE["to"] = replace_with_to


@pytest.mark.parametrize("how", list(REPLACE))
@pytest.mark.parametrize("case", ["nesterov+wd", "adamw"])
def test_replaced_parameters_are_picked_up(backend, case, how):
    """Parameters replaced between steps: the result equals a fresh optimiser with the same state."""
    make = ROUND_TRIP[case]
    sequence = gradient_sequence()
    values = {k: v + 1.0 for k, v in initial_params().items()}

    model = fresh_model(backend)
    opt = make(model, 0.01)
    apply(backend, model, opt, sequence[:2])
    saved = opt.state_dict()
    REPLACE[how](backend, model, values)
    apply(backend, model, opt, sequence[2:])

    reference = fresh_model(backend, values)
    reference_opt = make(reference, 0.5)
    reference_opt.load_state_dict(saved)
    apply(backend, reference, reference_opt, sequence[2:])
    for key, value in host_params(reference).items():
        assert np.array_equal(host_params(model)[key], value)
    assert opt.steps == reference_opt.steps == STEPS


def test_a_dtype_change_moves_the_state_along(backend):
    model = fresh_model(backend)
    opt = optim.Adam(model, lr=0.01)
    apply(backend, model, opt, gradient_sequence()[:2])
    model.to(backend, backend.xp.float32)
    for g in gradient_sequence()[2:]:
        model[0].grads.update({k.split(".")[1]: backend.asarray(v, backend.xp.float32) for k, v in g.items()})
        opt.step()
    arrays = {
        **dict(model.named_parameters()),
        **{f"{k}/{s}": v for k, slots in opt.state.items() for s, v in slots.items()},
    }
    assert {k: to_host(v).dtype for k, v in arrays.items()} == {k: np.dtype(np.float32) for k in arrays}
    expected = adam_reference(0.01, 0.9, 0.999, 1e-8)
    for key, value in host_params(model).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5)


ODD_CASES = {
    "nesterov+wd": (
        lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda params, seq: sgd_reference(0.05, 0.8, True, 0.01, params, seq),
    ),
    "adam+l2": (
        lambda m: optim.Adam(m, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
        lambda params, seq: adam_reference(0.01, 0.8, 0.99, 1e-8, 0.1, params=params, sequence=seq),
    ),
    "adamw": (
        lambda m: optim.AdamW(m, lr=0.01, weight_decay=0.1),
        lambda params, seq: adam_reference(0.01, 0.9, 0.999, 1e-8, 0.1, True, params, seq),
    ),
}


def odd_model():
    """Layers without bias, batch norm, a layer without parameters in between."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False, rng=0), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3, bias=False, rng=1),
        nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2, rng=2),
    )  # fmt: skip


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_models_without_bias_and_with_batchnorm(backend, case):
    make, reference = ODD_CASES[case]
    model = odd_model()
    assert [name for name, _ in model.named_parameters()] == [
        "0.weight",
        "1.weight",
        "1.bias",
        "3.weight",
        "4.weight",
        "4.bias",
        "6.weight",
        "6.bias",
    ]
    rng = np.random.default_rng(2)
    params = {k: rng.standard_normal(v.shape) for k, v in model.named_parameters()}
    sequence = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(STEPS)]
    fresh_model(backend, params, model)
    apply(backend, model, make(model), sequence)
    expected = reference(params, sequence)
    for key, value in host_params(model).items():
        assert value.shape == params[key].shape
        np.testing.assert_allclose(value, expected[key], rtol=1e-12, atol=1e-14)


def test_gradients_are_gathered_in_parameter_order():
    """A layer's grads dict may hold its keys in another order than its params dict."""
    model = fresh_model(get_backend("numpy"))
    opt = optim.SGD(model, lr=0.1)
    for grads in gradient_sequence():
        model[0].grads = {"bias": grads["0.bias"], "weight": grads["0.weight"]}
        opt.step()
    expected = sgd_reference(0.1)
    for key, value in host_params(model).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-12)


def test_a_model_without_parameters_steps_without_error():
    opt = optim.Adam(nn.Sequential(nn.ReLU(), nn.Flatten()))
    opt.step()
    assert opt.steps == 1 and opt.state_dict()["state"] == {}


def test_parameters_of_another_shape_after_the_state_was_made_are_an_error():
    model = fresh_model(get_backend("numpy"))
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    apply(get_backend("numpy"), model, opt, gradient_sequence()[:1])
    model[0].params.update(weight=np.zeros((4, 3)), bias=np.zeros(4))  # set_parameters would refuse the shapes
    model[0].grads.update(weight=np.zeros((4, 3)), bias=np.zeros(4))
    with pytest.raises(ValueError, match="parameters changed since the optimiser state was made"):
        opt.step()


def test_mixed_dtypes_are_an_error():
    model = nn.Sequential(nn.Linear(4, 3))
    model.set_parameters({"0.weight": np.zeros((3, 4), np.float32), "0.bias": np.zeros(3, np.float64)})
    model[0].grads.update(weight=np.zeros((3, 4), np.float32), bias=np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="parameters must share one dtype"):
        optim.SGD(model, lr=0.1).step()


def test_a_gradient_of_the_wrong_shape_is_an_error():
    model = fresh_model(get_backend("numpy"))
    model[0].grads.update(weight=np.zeros((4, 3)), bias=np.zeros(3))
    with pytest.raises(ValueError, match=r"gradient for 0.weight has shape \(4, 3\), expected \(3, 4\)"):
        optim.SGD(model, lr=0.1).step()


@pytest.mark.parametrize(
    "state, message",
    [
        ({"0.weight": {"momentum": np.zeros((3, 4))}}, r"no 'momentum' for \['0.bias'\]"),
        ({"0.weight": {"momentum": np.zeros((4, 3))}, "0.bias": {"momentum": np.zeros(3)}}, "has shape"),
        ({"0.weight": {"exp_avg": np.zeros((3, 4))}, "0.bias": {"exp_avg": np.zeros(3)}}, "unexpected slots"),
        ({"1.weight": {}}, r"unexpected \['1.weight'\]"),
    ],
)
def test_load_state_dict_rejects_state_that_does_not_fit(state, message):
    opt = optim.SGD(fresh_model(get_backend("numpy")), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict({"steps": 1, "lr": 0.1, "state": state})


@pytest.mark.parametrize("state", [{"state": {}, "param_groups": [{"lr": 0.1}]}, None, {"steps": 1}])
def test_load_state_dict_refuses_what_is_not_an_xpcnn_optimisers_state(state):
    """PyTorch's optimiser state_dict (no 'steps') gave a bare KeyError."""
    opt = optim.SGD(fresh_model(get_backend("numpy")), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="not an xpcnn optimiser's state_dict"):
        opt.load_state_dict(state)


def test_step_without_gradients_is_an_error_that_says_no_parameter_can_be_left_out():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no gradients for"):
        optim.SGD(model, lr=0.1).step()
    model(np.ones((3, 2), np.float32))
    model.backward(np.ones((3, 2), np.float32))
    del model[0].grads["bias"]  # a PyTorch user's frozen parameter: torch skips it
    with pytest.raises(RuntimeError, match=r"no gradients for \['0.bias'\].*none can be left out"):
        optim.SGD(model, lr=0.1).step()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: optim.SGD(m, lr=0), "lr must be a number >= 1.18e-38"),
        (lambda m: optim.SGD(m, lr=1e-46), "lr must be a number >= 1.18e-38"),  # 0 in float32
        (lambda m: optim.SGD(m, lr=float("inf")), "lr must be a number >= "),
        (lambda m: optim.SGD(m, lr=float("nan")), "lr must be a number >= "),
        (lambda m: optim.SGD(m, lr=0.1, momentum=1.0), "momentum must be in"),
        (lambda m: optim.SGD(m, lr=0.1, nesterov=True), "nesterov needs momentum"),
        (lambda m: optim.SGD(m, lr=0.1, weight_decay=float("inf")), "weight_decay must be a number >= 0"),
        (lambda m: optim.Adam(m, betas=(0.9, 1.0)), "betas must be two numbers in"),
        (
            lambda m: optim.Adam(m, betas=(0.9, 0.9, 0.9)),
            r"betas must be two numbers in \[0, 1\), got \(0.9, 0.9, 0.9\)",
        ),
        (lambda m: optim.Adam(m, eps=0.0), "eps must be a number > 0"),
        (lambda m: optim.AdamW(m, weight_decay=-1), "weight_decay must be a number >= 0"),
        (lambda m: optim.AdamW(m, weight_decay=float("inf")), "weight_decay must be a number >= 0"),
        (lambda m: optim.SGD(m, lr=0.1, ema=1.0), "ema must be a decay in"),
        (lambda m: optim.Adam(m, ema=-0.1), "ema must be a decay in"),
        (lambda m: optim.AdamW(m, ema=float("nan")), "ema must be a decay in"),
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


def averaged_reference(decay: float, snapshots: list[dict]) -> dict:
    """The debiased moving average in float64 NumPy: step t weighs the parameters after step i by
    (1 - d) d^(t - i) / (1 - d^t)."""
    t = len(snapshots)
    weights = [(1 - decay) * decay ** (t - i) / (1 - decay**t) for i in range(1, t + 1)]
    return {key: sum(w * p[key] for w, p in zip(weights, snapshots, strict=True)) for key in snapshots[0]}


EMA_CASES = {
    "momentum": (
        lambda m, ema: optim.SGD(m, lr=0.1, momentum=0.9, ema=ema),
        lambda sequence: sgd_reference(0.1, 0.9, sequence=sequence),
    ),
    "adamw": (
        lambda m, ema: optim.AdamW(m, lr=0.01, weight_decay=0.1, ema=ema),
        lambda sequence: adam_reference(0.01, 0.9, 0.999, 1e-8, 0.1, decoupled=True, sequence=sequence),
    ),
}


@pytest.mark.parametrize("case", list(EMA_CASES))
def test_the_moving_average_of_the_weights_matches_its_formula(backend, case):
    make, reference = EMA_CASES[case]
    grads = gradient_sequence()
    snapshots = [reference(grads[:t]) for t in range(1, STEPS + 1)]
    model = fresh_model(backend)
    opt = make(model, 0.7)
    assert opt.averaged_parameters().keys() == initial_params().keys()  # before a step: the weights themselves
    assert all(np.array_equal(to_host(v), initial_params()[k]) for k, v in opt.averaged_parameters().items())
    apply(backend, model, opt, grads)
    expected = averaged_reference(0.7, snapshots)
    for key, value in opt.averaged_parameters().items():
        np.testing.assert_allclose(to_host(value), expected[key], rtol=1e-12, atol=1e-14)
        assert not np.allclose(to_host(value), snapshots[-1][key])  # an average, not the last weights
    # The average changes nothing of training: the weights are those of the optimiser without it.
    plain = fresh_model(backend)
    apply(backend, plain, make(plain, 0.0), grads)
    assert all(np.array_equal(v, host_params(plain)[k]) for k, v in host_params(model).items())
    # The same average from the state a checkpoint keeps, loaded into a fresh optimiser.
    saved = opt.state_dict()
    assert all("ema" in slots for slots in saved["state"].values())
    loaded = make(fresh_model(backend), 0.7)
    loaded.load_state_dict(saved)
    for key, value in loaded.averaged_parameters().items():
        np.testing.assert_allclose(to_host(value), expected[key], rtol=1e-12, atol=1e-14)


def test_without_ema_there_is_no_average_slot():
    model = fresh_model(get_backend("numpy"))
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    apply(get_backend("numpy"), model, opt, gradient_sequence()[:1])
    assert all(list(slots) == ["momentum"] for slots in opt.state_dict()["state"].values())
    assert all(v is p for (_, p), v in zip(model.named_parameters(), opt.averaged_parameters().values(), strict=True))


def test_the_average_of_a_state_and_an_optimiser_must_agree():
    numpy = get_backend("numpy")
    model = fresh_model(numpy)
    with_average = optim.SGD(model, lr=0.1, ema=0.9)
    apply(numpy, model, with_average, gradient_sequence()[:1])
    with pytest.raises(ValueError, match=r"unexpected slots \['ema'\] \(it was made with ema"):
        optim.SGD(fresh_model(numpy), lr=0.1).load_state_dict(with_average.state_dict())
    model = fresh_model(numpy)
    without = optim.SGD(model, lr=0.1, momentum=0.9)
    apply(numpy, model, without, gradient_sequence()[:1])
    with pytest.raises(ValueError, match="holds no moving average of the weights"):
        optim.SGD(fresh_model(numpy), lr=0.1, momentum=0.9, ema=0.9).load_state_dict(without.state_dict())
    # Before any step there is nothing to average yet: a fresh state loads, and the weights are their own average.
    fresh = {"steps": 0, "lr": 0.1, "state": {}}
    model = fresh_model(numpy)
    loaded = optim.SGD(model, lr=0.1, ema=0.9)
    loaded.load_state_dict(fresh)
    assert all(
        v is p for (_, p), v in zip(model.named_parameters(), loaded.averaged_parameters().values(), strict=True)
    )
