#!/usr/bin/env python3
"""Count the array operations in one training step, per layer: a GPU's kernel launches, measured on a CPU.

On a GPU a small network's training step is bound by how many kernels Python
launches, not by arithmetic.  This runs xpcnn's reference path on the torch
backend (CPU) under torch's profiler and counts the operations that would each
launch at least one kernel on a GPU, layer by layer, beside PyTorch eager's
count for the same step.  An operation is counted once, at its outermost ATen
call (a multiplication by a Python scalar is one operation, though torch's CPU
code copies the scalar first); a view-making call (a reshape, a permute) counts
only the copies it makes inside.

    python scripts/count_ops.py [--model convnet] [--batch 128]
"""

import argparse
import collections

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from xpcnn import bench
from xpcnn.backend import get_backend
from xpcnn.models import MODELS, build
from xpcnn.nn import CrossEntropyLoss
from xpcnn.optim import SGD

# Operations that only make a view, read metadata or allocate: no kernel.
NO_KERNEL = {
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "as_strided_", "detach", "empty", "empty_like",
    "empty_strided", "expand", "flatten", "item", "lift_fresh", "matrix_H", "mT", "numpy_T", "permute", "reshape",
    "resize_", "resolve_conj", "resolve_neg", "result_type", "select", "slice", "squeeze", "swapaxes", "t", "to",
    "transpose", "unbind", "unsqueeze", "view",
}  # fmt: skip


def launches(fn) -> tuple[object, collections.Counter]:
    """Run ``fn`` under the profiler: its result and a count of its kernel-launching operations by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    ops = collections.Counter()

    def count(event):
        name = event.name.removeprefix("aten::")
        if name not in NO_KERNEL:
            ops[name] += 1
        else:  # a view, unless it had to copy: look inside
            for child in event.cpu_children:
                count(child)

    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            count(event)
    return result, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backend = get_backend("torch", "cpu")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(size=(args.batch, 1, 28, 28)), backend.xp.float32)
    y = backend.asarray(rng.integers(0, 10, args.batch))

    model = build(args.model, seed=0).to(backend)
    model.set_generator(backend.generator(0))
    loss_fn = CrossEntropyLoss(check_labels=False)
    optimizer = SGD(model, 0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)  # the training default
    for _ in range(2):  # warm up, so that one-time set-up is not counted
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step()

    rows = []
    h = x
    for layer in model:
        h, ops = launches(lambda layer=layer, h=h: layer.forward(h))
        rows.append((f"forward {layer!r}", ops))
    (_, grad), ops = launches(lambda: (loss_fn.forward(h, y), loss_fn.backward()))
    rows.append(("loss forward and backward", ops))
    layers = list(model)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        options = {"input_grad": False} if index == 0 else {}
        grad, ops = launches(lambda layer=layer, grad=grad, options=options: layer.backward(grad, **options))
        rows.append((f"backward {layer!r}", ops))
    rows.append(("optimizer step (SGD, Nesterov, weight decay)", launches(optimizer.step)[1]))

    twin = bench.torch_twin(build(args.model, seed=0))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    twin_loss = torch.nn.CrossEntropyLoss()

    def twin_step():
        twin_optimizer.zero_grad()
        twin_loss(twin(x), y).backward()
        twin_optimizer.step()

    twin_step()
    _, twin_ops = launches(twin_step)

    total = sum((ops for _, ops in rows), collections.Counter())
    width = max(len(name) for name, _ in rows)
    for name, ops in rows:
        detail = ", ".join(f"{op} {count}" for op, count in ops.most_common())
        print(f"{name:<{width}}  {sum(ops.values()):4d}  {detail}")
    print(f"{'xpcnn, one training step':<{width}}  {sum(total.values()):4d}")
    print(f"{'PyTorch eager, the same step':<{width}}  {sum(twin_ops.values()):4d}")


if __name__ == "__main__":
    main()
