"""ONNX and safetensors export: ONNX Runtime and the PyTorch twin agree with xpcnn's evaluation-mode output."""

import json
import os
import re
import stat
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import small_resnet

from xpcnn import nn
from xpcnn.apps.export import ExportError, export, onnx_model
from xpcnn.backends.backend import get_backend
from xpcnn.data.device_data import Normalization, normalize_images
from xpcnn.functional import softmax
from xpcnn.models import MODELS, build

NORM = Normalization(0.1307, 0.3081)
TOLERANCE = 1e-5  # float32, absolute and relative


def trained_looking(model: nn.Sequential, seed: int = 1) -> nn.Sequential:
    """``model`` with non-zero biases and batch-norm affine parameters and running statistics, in eval mode.

    A fresh model's biases are 0 and its running statistics 0 and 1: an export that dropped or swapped
    them would still pass.
    """
    rng = np.random.default_rng(seed)
    for _, layer in model._holders():  # nested containers' layers too
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


MODEL_CASES = [*MODELS, "general", "resnet"]  # resnet: nested containers, Residual blocks, global average pooling


def built(name: str, seed: int) -> nn.Sequential:
    if name == "general":
        return small_general_model()
    return small_resnet(seed) if name == "resnet" else build(name, seed=seed)


def model_case(name: str) -> nn.Sequential:
    return trained_looking(built(name, seed=3))


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

    from xpcnn.apps.export import torch_twin

    model = model_case(name)
    path = tmp_path / "model.safetensors"
    export(model, NORM, "safetensors", path, metadata={"model": name})
    other_weights = built(name, seed=99)
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


def test_an_unknown_layer_or_last_layer_is_a_clear_error():
    pytest.importorskip("onnx")
    model = nn.Sequential(nn.Flatten(), Square(), nn.Linear(784, 10, rng=0))
    with pytest.raises(ExportError, match=r"cannot export layer 1 \(Square\(\)\): ONNX export knows Conv2d"):
        onnx_model(model, NORM)
    with pytest.raises(ExportError, match=r"does not end with a Linear layer \(it ends with ReLU\(\)\)"):
        onnx_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10, rng=0), nn.ReLU()), NORM)


def test_softmax_is_refused_for_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(ExportError, match="softmax applies to ONNX"):
        export(build("seed"), NORM, "safetensors", tmp_path / "m.safetensors", softmax=True)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the command line


def invoke(*args, expect=0):
    from xpcnn.apps.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, pattern):
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.output


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seed"
    invoke("train", "--model", "seed", "--epochs", "1", "--device", "cpu", "--data-dir", synthetic_dir, "--out", run)
    return run


def test_export_onnx_from_a_run_predicts_what_xpcnn_predicts(trained_run, tmp_path):
    pytest.importorskip("onnx")
    from xpcnn.data.checkpoint import load_checkpoint
    from xpcnn.training.runs import model_from_checkpoint
    from xpcnn.training.train import predict_probabilities

    output = tmp_path / "model.onnx"
    text = invoke("export", trained_run, "--format", "onnx", "--output", output, "--softmax").output
    assert text.strip() == f"wrote {output} (onnx: images (N, 1, 28, 28) in [0, 1] -> probabilities (N, 10))"
    x = images(20)
    (actual,) = onnx_session(output).run(None, {"images": x})
    numpy = get_backend("numpy", "cpu")
    model, norm = model_from_checkpoint(load_checkpoint(trained_run), numpy)
    expected = predict_probabilities(model, normalize_images(numpy, x, norm))
    np.testing.assert_allclose(actual, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_export_safetensors_records_the_model_classes_and_normalisation(trained_run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    from xpcnn.data.checkpoint import load_checkpoint

    output = tmp_path / "model.safetensors"
    text = invoke("export", trained_run / "checkpoint.npz", "--format", "safetensors", "--output", output).output
    assert text.startswith(f"wrote {output} (safetensors: PyTorch key names; normalise inputs with mean 0.")
    checkpoint = load_checkpoint(trained_run)
    with safe_open(output, "np") as stored:
        meta = stored.metadata()
        weights = {key: stored.get_tensor(key) for key in stored.keys()}
    assert meta["model"] == "seed" and meta["classes"] == json.dumps(checkpoint.meta["classes"])
    assert float(meta["input_mean"]) == checkpoint.meta["normalization"]["mean"]
    assert weights.keys() == checkpoint.model_state.keys()
    for key, value in weights.items():
        np.testing.assert_array_equal(value, checkpoint.model_state[key])


def test_an_existing_output_is_kept_unless_forced(trained_run, tmp_path):
    pytest.importorskip("onnx")
    output = tmp_path / "model.onnx"
    output.write_bytes(b"an earlier export")
    result = invoke("export", trained_run, "--format", "onnx", "--output", output, expect=2)
    assert_one_line_error(result, r"model.onnx exists: pass --force to replace it")
    assert output.read_bytes() == b"an earlier export"
    invoke("export", trained_run, "--format", "onnx", "--output", output, "--force")
    assert output.read_bytes().startswith(b"\x08")  # a ModelProto: field 1 (ir_version), a varint


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_forcing_onto_something_that_is_not_a_file_is_refused(trained_run, tmp_path):
    pytest.importorskip("safetensors")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = invoke("export", trained_run, "--format", "safetensors", "--output", fifo, "--force", expect=1)
    assert_one_line_error(result, r"pipe exists and is not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["pipe"]


@pytest.mark.parametrize("format, module", [("onnx", "onnx"), ("safetensors", "safetensors.numpy")])
def test_a_missing_extra_is_one_line_naming_it(trained_run, tmp_path, monkeypatch, format, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    output = tmp_path / f"model.{format}"
    result = invoke("export", trained_run, "--format", format, "--output", output, expect=1)
    assert_one_line_error(result, rf'export to {format} needs the export extra: pip install "xpcnn\[export\]"')
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, pattern, code",
    [
        (["{run}", "--format", "tflite", "--output", "{tmp}/m"], r"Invalid value for '--format'", 2),
        (["{tmp}/nothing.npz", "--format", "onnx", "--output", "{tmp}/m.onnx"], r"does not exist", 2),
        (["{corrupt}", "--format", "onnx", "--output", "{tmp}/m.onnx"], r"not an xpcnn checkpoint", 1),
        (["{run}", "--format", "safetensors", "--output", "{tmp}/m", "--softmax"], r"--softmax applies to", 2),
        (["{run}", "--format", "onnx", "--output", "{tmp}/no/m.onnx"], r"no is not a directory", 2),
    ],
)
def test_user_errors_are_one_line(trained_run, tmp_path, args, pattern, code):
    if "{corrupt}" in args:
        pytest.importorskip("onnx")  # a missing extra is reported before the checkpoint is read
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    names = {"run": trained_run, "tmp": tmp_path, "corrupt": corrupt}
    result = invoke("export", *[a.format(**names) for a in args], expect=code)
    assert_one_line_error(result, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz"]


def test_an_export_finding_its_output_written_meanwhile_replaces_nothing(trained_run, tmp_path):
    """Two exports to one new file both passed the check for an existing output, and the later replaced the
    earlier's file, while both said they wrote it: without --force the file is put in place only if none is."""
    pytest.importorskip("safetensors")
    from xpcnn.apps.export import ExportError, export
    from xpcnn.backends.backend import get_backend
    from xpcnn.data.checkpoint import load_checkpoint
    from xpcnn.training.runs import model_from_checkpoint

    model, norm = model_from_checkpoint(load_checkpoint(trained_run), get_backend("numpy", "cpu"))
    output = tmp_path / "model.safetensors"
    output.write_bytes(b"the other export's file")
    with pytest.raises(ExportError, match=r"model.safetensors was written meanwhile by another process: pass --force"):
        export(model, norm, "safetensors", output, replace=False)
    assert output.read_bytes() == b"the other export's file" and [p.name for p in tmp_path.iterdir()] == [output.name]
    export(model, norm, "safetensors", output)  # replace=True, as --force asks
    assert output.read_bytes() != b"the other export's file"


def test_a_file_name_near_the_systems_limit_is_written(trained_run, tmp_path):
    """The temporary file's name was the output's plus 15 bytes: a 241-255 byte name gave "File name too long"."""
    pytest.importorskip("safetensors")
    output = tmp_path / ("b" * 243 + ".safetensors")
    invoke("export", trained_run, "--format", "safetensors", "--output", output)
    assert [p.name for p in tmp_path.iterdir()] == [output.name]


def test_a_run_being_trained_and_a_path_naming_a_directory_are_refused(trained_run, tmp_path):
    started = tmp_path / "started"  # a run in its first epoch: config.json, no checkpoint yet
    started.mkdir()
    (started / "config.json").write_text("{}")
    output = started / "config.json"
    result = invoke("export", trained_run, "--format", "onnx", "--output", output, "--force", expect=2)
    assert_one_line_error(result, r"config.json is a file of the run in .*started: pick another --output")
    assert (started / "config.json").read_text() == "{}"
    result = invoke("export", trained_run, "--format", "onnx", "--output", f"{tmp_path}/new/", expect=2)
    assert_one_line_error(result, r"names a directory \(it ends with /\): name the file")
    assert not (tmp_path / "new").exists()


def test_a_run_without_a_checkpoint_says_so_whatever_the_output(tmp_path):
    (tmp_path / "existing.onnx").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    result = invoke(
        "export", tmp_path / "empty", "--format", "onnx", "--output", tmp_path / "existing.onnx", "--force", expect=1
    )
    assert_one_line_error(result, r"empty holds no checkpoint.npz")
