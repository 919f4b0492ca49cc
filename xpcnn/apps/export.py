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

from .. import __version__, nn
from ..base.errors import XpcnnError
from ..base.files import atomic_output

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

    def emit(layer: nn.Layer, prefix: str, value: str) -> str:
        """Append the nodes of ``layer`` (parameters named ``prefix + name``) on input ``value``; its output."""
        if isinstance(layer, nn.Dropout):
            return value
        if isinstance(layer, nn.Sequential):
            for index, inner in enumerate(layer):
                value = emit(inner, f"{prefix}{index}.", value)
            return value
        if isinstance(layer, nn.Residual):
            branch = emit(layer.branch, f"{prefix}branch.", value)
            shortcut = value if layer.projection is None else emit(layer.projection, f"{prefix}projection.", value)
            nodes.append(helper.make_node("Add", [branch, shortcut], [f"{prefix}output"], name=f"{prefix}Residual"))
            return f"{prefix}output"
        names = [prefix + name for name in _onnx_inputs(layer)]
        initializers.extend(numpy_helper.from_array(state[name].astype(np.float32), name) for name in names)
        for node in _onnx_nodes(prefix, layer):
            nodes.append(helper.make_node(**node, inputs=[value, *names], outputs=[node["name"] + ".output"]))
            value, names = node["name"] + ".output", []
        return value

    nodes.append(helper.make_node("Identity", [emit(model, "", "normalised")], [output_name], name="output"))
    if softmax:
        nodes[-1] = helper.make_node("Softmax", [nodes[-1].input[0]], [output_name], name="softmax", axis=1)
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


def _onnx_nodes(prefix: str, layer: nn.Layer) -> list[dict]:
    """Keyword arguments of ``onnx.helper.make_node`` (operator, name, attributes) for one layer's nodes;
    the first takes the layer's parameters."""
    name = f"{prefix}{type(layer).__name__}"
    if isinstance(layer, nn.Conv2d):
        ph, pw = layer.padding
        return [
            dict(
                op_type="Conv",
                name=name,
                kernel_shape=list(layer.kernel_size),
                strides=list(layer.stride),
                pads=[ph, pw, ph, pw],
            )
        ]
    if isinstance(layer, nn.MaxPool2d):  # floor mode: rows and columns no window covers are dropped, as in xpcnn
        return [dict(op_type="MaxPool", name=name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride))]
    if isinstance(layer, nn.GlobalAvgPool2d):  # (N, C, 1, 1), then (N, C)
        return [dict(op_type="GlobalAveragePool", name=name), dict(op_type="Flatten", name=f"{name}.flatten", axis=1)]
    if isinstance(layer, nn.ReLU):
        return [dict(op_type="Relu", name=name)]
    if isinstance(layer, nn.Flatten):
        return [dict(op_type="Flatten", name=name, axis=1)]
    if isinstance(layer, nn.Linear):
        return [dict(op_type="Gemm", name=name, transB=1)]
    if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        return [dict(op_type="BatchNormalization", name=name, epsilon=float(layer.eps))]
    where = f"layer {prefix[:-1]}" if prefix else "the model"
    raise ExportError(
        f"cannot export {where} ({layer!r}): ONNX export knows Conv2d, MaxPool2d, GlobalAvgPool2d, ReLU, "
        "Flatten, Linear, BatchNorm1d, BatchNorm2d, Dropout, Sequential and Residual"
    )


def safetensors_tensors(model: nn.Sequential) -> dict[str, np.ndarray]:
    """The host arrays a PyTorch twin's ``state_dict`` holds: parameters, buffers, ``num_batches_tracked``."""
    tensors = model.state_dict()
    for prefix, layer in model._holders():
        if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            tensors[f"{prefix}num_batches_tracked"] = np.asarray(0, np.int64)
    return tensors


def torch_twin(model):
    """The same architecture and weights as an xpcnn ``Sequential``, as a ``torch.nn.Sequential``.

    The PyTorch model a :func:`safetensors_tensors` file loads into; the benchmarks' PyTorch side and the
    tests' oracle.  Raises ValueError for a layer PyTorch has no twin of here.
    """
    import torch

    twin = _torch_layer(torch, model)
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if unexpected or not all(k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(
            f"the torch twin does not match the model's weights: missing {missing}, unexpected {unexpected}"
        )
    return twin


def _torch_layer(torch, layer: nn.Layer):
    """``layer`` as a torch module (containers: their children too), with fresh weights."""
    if isinstance(layer, nn.Sequential):
        return torch.nn.Sequential(*(_torch_layer(torch, inner) for inner in layer))
    if isinstance(layer, nn.Residual):
        return _torch_residual(torch)(
            _torch_layer(torch, layer.branch),
            None if layer.projection is None else _torch_layer(torch, layer.projection),
        )
    if isinstance(layer, nn.Conv2d):
        return torch.nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            bias="bias" in layer.params,
        )
    if isinstance(layer, nn.Linear):
        return torch.nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, nn.MaxPool2d):
        return torch.nn.MaxPool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, nn.GlobalAvgPool2d):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
        kind = torch.nn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d) else torch.nn.BatchNorm1d
        return kind(layer.num_features, layer.eps, layer.momentum)
    if isinstance(layer, nn.ReLU):
        return torch.nn.ReLU()
    if isinstance(layer, nn.Flatten):
        return torch.nn.Flatten()
    if isinstance(layer, nn.Dropout):
        return torch.nn.Dropout(layer.p)
    raise ValueError(f"no torch twin for {layer!r}")


def _torch_residual(torch):
    """The torch module of :class:`xpcnn.nn.Residual`: ``branch(x) + (projection or identity)(x)``."""

    class Residual(torch.nn.Module):
        def __init__(self, branch, projection=None):
            super().__init__()
            self.branch, self.projection = branch, projection

        def forward(self, x):
            return self.branch(x) + (x if self.projection is None else self.projection(x))

    return Residual


def export(
    model: nn.Sequential,
    norm,
    format: str,
    path: str | os.PathLike,
    softmax: bool = False,
    metadata: dict[str, str] | None = None,
    replace: bool = True,
) -> None:
    """Write ``model`` (with ``norm``'s ``mean`` and ``std``) to ``path`` as ``format``, atomically.

    ``softmax`` (ONNX only) makes the output probabilities; ``metadata`` (str -> str) is stored in the
    file beside the normalisation and the producer.  With ``replace`` False, ExportError where ``path`` exists
    by the time the file is written (another export to it, meanwhile), and nothing is replaced.
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
    try:
        with atomic_output(path, replace=replace) as out:
            out.write(data)
    except FileExistsError:
        message = f"{os.fspath(path)} was written meanwhile by another process: pass --force to replace it"
        raise ExportError(message) from None
