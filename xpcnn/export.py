"""A trained model and its input normalisation as an ONNX graph or a safetensors file of PyTorch weights.

ONNX: the evaluation-mode network with the normalisation built in, so it takes raw images
``images`` (N, 1, 28, 28) float32 in [0, 1] and gives ``logits`` (N, K), or ``probabilities`` (N, K)
with ``softmax=True``.  Dropout is left out (the identity in evaluation); batch norm is a
``BatchNormalization`` node holding the running statistics, so no weight is rearranged.

safetensors: the model's ``state_dict`` under PyTorch's key names, plus each batch norm's
``num_batches_tracked`` (always 0: xpcnn does not count batches; PyTorch reads it only with
``momentum=None``), so a ``torch.nn.Sequential`` of the same layers loads it with the default
``strict=True``.  The file holds weights only: the input normalisation is in its metadata
(``input_mean``, ``input_std``), for the caller to apply.

onnx and safetensors are the optional extra ``pip install "xpcnn[export]"``, imported only here.
"""

from __future__ import annotations

import os

import numpy as np

from . import __version__, nn
from .errors import XpcnnError
from .files import atomic_output

FORMATS = ("onnx", "safetensors")
EXPORT_HINT = 'export to {format} needs the export extra: pip install "xpcnn[export]"'
OPSET = 17  # Softmax over one axis (13+), BatchNormalization without training outputs (15+)
IR_VERSION = 8  # the IR of opset 17 (onnx 1.12): older runtimes accept it too
INPUT_NAME = "images"
INPUT_SHAPE = (1, 28, 28)  # per image, raw pixels in [0, 1]
BATCH_DIM = "N"


class ExportError(XpcnnError, ValueError):
    """A model that cannot be exported, or an export package that is missing."""


def require(format: str) -> None:
    """Raise ExportError now (before any work) if ``format`` cannot be written here."""
    _import(format)


def _import(format: str):
    """The package that writes ``format``: the onnx module, or safetensors.numpy."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: expected one of {', '.join(FORMATS)}")
    try:
        if format == "onnx":
            import onnx

            return onnx
        import safetensors.numpy

        return safetensors.numpy
    except ImportError:
        raise ExportError(EXPORT_HINT.format(format=format)) from None


def onnx_model(model: nn.Sequential, norm, softmax: bool = False, metadata: dict[str, str] | None = None):
    """The evaluation-mode ``model`` after ``(x - norm.mean) / norm.std`` as a checked ``onnx.ModelProto``.

    ``norm`` has ``mean`` and ``std`` in [0, 1] units.  Parameters become float32 initializers under
    their PyTorch key names (``"0.weight"``...).  ``metadata`` goes into the model's metadata_props.
    """
    onnx = _import("onnx")
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(model[-1], nn.Linear):
        raise ExportError(f"cannot export a model that does not end with a Linear layer (it ends with {model[-1]!r})")
    state = model.state_dict()
    initializers = [
        numpy_helper.from_array(np.asarray(norm.mean, np.float32), "input_mean"),
        numpy_helper.from_array(np.asarray(1.0 / norm.std, np.float32), "input_scale"),  # xpcnn multiplies too
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "input_mean"], ["centred"], name="normalise_mean"),
        helper.make_node("Mul", ["centred", "input_scale"], ["normalised"], name="normalise_scale"),
    ]
    output_name = "probabilities" if softmax else "logits"
    layers = [(index, layer) for index, layer in enumerate(model) if not isinstance(layer, nn.Dropout)]
    value = "normalised"
    for index, layer in layers:
        names = [f"{index}.{name}" for name in _onnx_inputs(layer)]
        initializers += [numpy_helper.from_array(state[name].astype(np.float32), name) for name in names]
        output = output_name if index == layers[-1][0] and not softmax else f"{index}.output"
        nodes.append(helper.make_node(**_onnx_node(index, layer), inputs=[value, *names], outputs=[output]))
        value = output
    if softmax:
        nodes.append(helper.make_node("Softmax", [value], [output_name], name="softmax", axis=1))
    classes = model[-1].out_features
    graph = helper.make_graph(
        nodes,
        "xpcnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *INPUT_SHAPE])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [BATCH_DIM, classes])],
        initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="xpcnn",
        producer_version=__version__,
    )
    helper.set_model_props(
        proto, {"input_mean": repr(float(norm.mean)), "input_std": repr(float(norm.std)), **(metadata or {})}
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _onnx_inputs(layer: nn.Layer) -> list[str]:
    """The parameter and buffer names a layer's ONNX node takes after its input, in the operator's order."""
    if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        return ["weight", "bias", "running_mean", "running_var"]
    return [name for name in ("weight", "bias") if name in layer.params]


def _onnx_node(index: int, layer: nn.Layer) -> dict:
    """Keyword arguments of ``onnx.helper.make_node`` (operator, name, attributes) for one layer."""
    name = f"{index}.{type(layer).__name__}"
    if isinstance(layer, nn.Conv2d):
        ph, pw = layer.padding
        return dict(
            op_type="Conv",
            name=name,
            kernel_shape=list(layer.kernel_size),
            strides=list(layer.stride),
            pads=[ph, pw, ph, pw],
        )
    if isinstance(layer, nn.MaxPool2d):  # floor mode: rows and columns no window covers are dropped, as in xpcnn
        return dict(op_type="MaxPool", name=name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride))
    if isinstance(layer, nn.ReLU):
        return dict(op_type="Relu", name=name)
    if isinstance(layer, nn.Flatten):
        return dict(op_type="Flatten", name=name, axis=1)
    if isinstance(layer, nn.Linear):
        return dict(op_type="Gemm", name=name, transB=1)
    if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        return dict(op_type="BatchNormalization", name=name, epsilon=float(layer.eps))
    raise ExportError(
        f"cannot export layer {index} ({layer!r}): ONNX export knows Conv2d, MaxPool2d, ReLU, Flatten, "
        "Linear, BatchNorm1d, BatchNorm2d and Dropout"
    )


def safetensors_tensors(model: nn.Sequential) -> dict[str, np.ndarray]:
    """The host arrays a PyTorch twin's ``state_dict`` holds: parameters, buffers, ``num_batches_tracked``."""
    tensors = model.state_dict()
    for index, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            tensors[f"{index}.num_batches_tracked"] = np.asarray(0, np.int64)
    return tensors


def torch_twin(model):
    """The same architecture and weights as an xpcnn ``Sequential``, as a ``torch.nn.Sequential``.

    The PyTorch model a :func:`safetensors_tensors` file loads into; the benchmarks' PyTorch side and the
    tests' oracle.  Raises ValueError for a layer PyTorch has no twin of here.
    """
    import torch

    layers = []
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            layers.append(
                torch.nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    layer.stride,
                    layer.padding,
                    bias="bias" in layer.params,
                )
            )
        elif isinstance(layer, nn.Linear):
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params))
        elif isinstance(layer, nn.MaxPool2d):
            layers.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride))
        elif isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
            kind = torch.nn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d) else torch.nn.BatchNorm1d
            layers.append(kind(layer.num_features, layer.eps, layer.momentum))
        elif isinstance(layer, nn.ReLU):
            layers.append(torch.nn.ReLU())
        elif isinstance(layer, nn.Flatten):
            layers.append(torch.nn.Flatten())
        elif isinstance(layer, nn.Dropout):
            layers.append(torch.nn.Dropout(layer.p))
        else:
            raise ValueError(f"no torch twin for {layer!r}")
    twin = torch.nn.Sequential(*layers)
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if unexpected or not all(k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(
            f"the torch twin does not match the model's weights: missing {missing}, unexpected {unexpected}"
        )
    return twin


def export(
    model: nn.Sequential,
    norm,
    format: str,
    path: str | os.PathLike,
    softmax: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model`` (with ``norm``'s ``mean`` and ``std``) to ``path`` as ``format``, atomically.

    ``softmax`` (ONNX only) makes the output probabilities; ``metadata`` (str -> str) is stored in the
    file beside the normalisation and the producer.
    """
    module = _import(format)
    if format == "onnx":
        data = onnx_model(model, norm, softmax, metadata).SerializeToString()
    elif softmax:
        raise ExportError("safetensors holds weights only: softmax applies to ONNX export")
    else:
        info = {
            "producer": f"xpcnn {__version__}",
            "input_mean": repr(float(norm.mean)),
            "input_std": repr(float(norm.std)),
            **(metadata or {}),
        }
        data = module.save(safetensors_tensors(model), metadata=info)
    with atomic_output(path) as out:
        out.write(data)
