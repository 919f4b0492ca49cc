"""ONNX and safetensors export: ONNX Runtime and the PyTorch twin agree with xpcnn's evaluation-mode output."""

import numpy as np
import pytest

from xpcnn import nn
from xpcnn.backend import get_backend
from xpcnn.export import ExportError, export, onnx_model
from xpcnn.functional import softmax
from xpcnn.models import MODELS, build
from xpcnn.train import Normalization, normalize_images

NORM = Normalization(0.1307, 0.3081)
TOLERANCE = 1e-5  # float32, absolute and relative


def trained_looking(model: nn.Sequential, seed: int = 1) -> nn.Sequential:
    """``model`` with non-zero biases and batch-norm affine parameters and running statistics, in eval mode.

    A fresh model's biases are 0 and its running statistics 0 and 1: an export that dropped or swapped
    them would still pass.
    """
    rng = np.random.default_rng(seed)
    for layer in model:
        if "bias" in layer.params:
            layer.params["bias"] = rng.normal(0, 0.1, layer.params["bias"].shape).astype(np.float32)
        if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            c = layer.num_features
            layer.params["weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            layer.buffers["running_mean"] = rng.normal(0, 0.5, c).astype(np.float32)
            layer.buffers["running_var"] = rng.uniform(0.3, 3.0, c).astype(np.float32)
    return model.eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    """Raw float32 images (n, 1, 28, 28) in [0, 1]."""
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def xpcnn_output(model: nn.Sequential, x: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """What xpcnn computes for raw images with NORM: logits or softmax probabilities (N, K)."""
    numpy = get_backend("numpy", "cpu")
    logits = model.forward(normalize_images(numpy, x, NORM))
    return np.asarray(softmax(logits, axis=1) if probabilities else logits)


def onnx_session(proto_or_path):
    ort = pytest.importorskip("onnxruntime")
    source = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def small_general_model() -> nn.Sequential:
    """Strides, padding, overlapping pooling, BatchNorm1d and dropout: what the named models do not cover."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, rng=0),  # 28 -> 14
        nn.ReLU(),
        nn.MaxPool2d(3, 2),  # -> 6
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 16, rng=1),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10, rng=2),
    )


MODEL_CASES = [*MODELS, "general"]


def model_case(name: str) -> nn.Sequential:
    return trained_looking(small_general_model() if name == "general" else build(name, seed=3))


@pytest.mark.parametrize("name", MODEL_CASES)
@pytest.mark.parametrize("probabilities", [False, True], ids=["logits", "softmax"])
def test_onnx_runtime_matches_xpcnn(name, probabilities):
    onnx = pytest.importorskip("onnx")
    model = model_case(name)
    proto = onnx_model(model, NORM, softmax=probabilities)
    onnx.checker.check_model(proto, full_check=True)
    session = onnx_session(proto)
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_input.shape) == ("images", ["N", 1, 28, 28])
    assert (graph_output.name, graph_output.shape) == ("probabilities" if probabilities else "logits", ["N", 10])
    for n in (1, 7):  # the batch dimension is dynamic
        x = images(n, seed=n)
        (actual,) = session.run(None, {"images": x})
        np.testing.assert_allclose(actual, xpcnn_output(model, x, probabilities), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_safetensors_load_strictly_into_the_torch_twin(name, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    from xpcnn.bench import torch_twin

    model = model_case(name)
    path = tmp_path / "model.safetensors"
    export(model, NORM, "safetensors", path, metadata={"model": name})
    other_weights = small_general_model() if name == "general" else build(name, seed=99)
    twin = torch_twin(other_weights)  # the same layers: every weight must come from the file
    twin.load_state_dict(safetensors_torch.load_file(path), strict=True)
    twin.eval()
    x = images(5)
    with safe_open(path, "np") as stored:
        meta = stored.metadata()
    assert meta["model"] == name and float(meta["input_mean"]) == NORM.mean and float(meta["input_std"]) == NORM.std
    with torch.no_grad():
        actual = twin(torch.from_numpy((x - np.float32(NORM.mean)) * np.float32(1 / NORM.std))).numpy()
    np.testing.assert_allclose(actual, xpcnn_output(model, x), rtol=TOLERANCE, atol=TOLERANCE)


class Square(nn.Layer):
    def forward(self, x):
        return x * x


def test_an_unknown_layer_is_a_clear_error():
    pytest.importorskip("onnx")
    model = nn.Sequential(nn.Flatten(), Square(), nn.Linear(784, 10, rng=0))
    with pytest.raises(ExportError, match=r"cannot export layer 1 \(Square\(\)\): ONNX export knows Conv2d"):
        onnx_model(model, NORM)


def test_softmax_is_refused_for_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(ExportError, match="softmax applies to ONNX"):
        export(build("seed"), NORM, "safetensors", tmp_path / "m.safetensors", softmax=True)
    assert not list(tmp_path.iterdir())
