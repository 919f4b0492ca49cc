#!/usr/bin/env python3
"""Count the array operations in the trainer's training step: a GPU's kernel launches, measured on a CPU.

On a GPU a small network's training step is bound by how many kernels Python
launches, not by arithmetic.  This runs the step the trainer runs (the core's
``Step.train`` through the eager runner, :func:`xpcnn.training.train.step_runner`:
gather the batch, forward, loss, backward, optimiser update, correct predictions)
on the torch backend (CPU) under torch's profiler and counts the operations that
would each launch at least one kernel on a GPU, beside PyTorch eager's count for
a plain step (forward, loss, backward, update).  Where they go: the same math
called layer by layer, and what the trainer's step does besides.  An operation
is counted once, at its outermost ATen call (a multiplication by a Python scalar
is one operation, though torch's CPU code copies the scalar first); a
view-making call (a reshape, a permute) counts only the copies it makes inside.

    python scripts/count_ops.py [--model convnet [--model seed ...] | --model all] [--batch 128]
"""

import argparse
import collections

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from xpcnn.apps import export
from xpcnn.backends.backend import get_backend
from xpcnn.models import MODELS, build
from xpcnn.nn import CrossEntropyLoss, _BatchNorm, update_running_statistics
from xpcnn.training.config import TrainConfig, make_optimizer
from xpcnn.training.train import step_runner

# Operations that only make a view, read metadata or allocate: no kernel.
NO_KERNEL = {
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "as_strided_", "detach", "diagonal", "empty",
    "empty_like", "empty_strided", "expand", "flatten", "item", "lift_fresh", "linalg_diagonal", "mT", "matrix_H",
    "numpy_T", "permute", "reshape", "resize_", "resolve_conj", "resolve_neg", "result_type", "select", "slice",
    "squeeze", "swapaxes", "t", "to", "transpose", "unbind", "unsqueeze", "view",
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


def count_model(name: str, batch: int) -> tuple[collections.Counter, list, int]:
    """The trainer's training step of model ``name`` (its operations by name), the same math counted layer by
    layer (rows of (what, operations)), and PyTorch eager's total for a plain step."""
    backend = get_backend("torch", "cpu")
    rng = np.random.default_rng(0)
    images = backend.asarray(rng.normal(size=(2 * batch, 1, 28, 28)), backend.xp.float32)
    labels = backend.asarray(rng.integers(0, 10, 2 * batch))
    batches = [backend.asarray(np.arange(i * batch, (i + 1) * batch)) for i in range(2)]
    x, y = images[:batch, ...], labels[:batch]

    config = TrainConfig(model=name)  # the training defaults: SGD with Nesterov momentum and weight decay
    model = build(name, seed=0).to(backend)
    optimizer = make_optimizer(config, model)
    loss_fn = CrossEntropyLoss(check_labels=False)
    runner = step_runner(model, loss_fn, optimizer, backend, config.seed)
    runner.start_epoch(0, 0)
    for step in range(2):  # warm up, so that one-time set-up is not counted
        runner.train_step(images, labels, batches[step], step)
    _, trainer_step = launches(lambda: runner.train_step(images, labels, batches[0], 2))

    model.set_generator(backend.generator(0))
    model.zero_grad()
    _, whole_forward = launches(lambda: model.forward(x))
    # Layer by layer as Sequential.forward runs them: batch norm's running statistics in one update at the end.
    rows, h, batch_statistics = [], x, []
    for layer in model:
        if isinstance(layer, _BatchNorm):
            (h, statistics), ops = launches(lambda layer=layer, h=h: layer.normalize(h))
            batch_statistics.append((layer, statistics))
        else:
            h, ops = launches(lambda layer=layer, h=h: layer.forward(h))
        rows.append((f"forward {layer!r}", ops))
    if batch_statistics:
        _, ops = launches(lambda: update_running_statistics(batch_statistics))
        rows.append(("forward: batch norm's running statistics, all layers", ops))
    by_layer = sum((ops for row, ops in rows if row.startswith("forward")), collections.Counter())
    if by_layer != whole_forward:
        raise SystemExit(f"{name}: the per-layer forward counts {by_layer} differ from model.forward's {whole_forward}")
    (_, grad), ops = launches(lambda: (loss_fn.forward(h, y), loss_fn.backward()))
    rows.append(("loss forward and backward", ops))
    layers = list(model)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        options = {"input_grad": False} if index == 0 else {}
        grad, ops = launches(lambda layer=layer, grad=grad, options=options: layer.backward(grad, **options))
        rows.append((f"backward {layer!r}", ops))
    rows.append(("optimizer update (SGD, Nesterov, weight decay)", launches(optimizer.step)[1]))

    twin = export.torch_twin(build(name, seed=0))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    twin_loss = torch.nn.CrossEntropyLoss()

    def twin_step():
        twin_optimizer.zero_grad()
        twin_loss(twin(x), y).backward()
        twin_optimizer.step()

    twin_step()
    _, twin_ops = launches(twin_step)
    return trainer_step, rows, sum(twin_ops.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        choices=[*MODELS, "all"],
        help="repeatable; 'all' (the default) counts every model",
    )
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    names = list(MODELS) if not args.model or "all" in args.model else list(dict.fromkeys(args.model))
    torch.set_num_threads(1)
    totals = []
    for name in names:
        trainer_step, rows, twin_total = count_model(name, args.batch)
        counted = sum((ops for _, ops in rows), collections.Counter())
        rows.append(("the trainer's step besides (batch gather, correct predictions)", trainer_step - counted))
        total = sum(trainer_step.values())
        totals.append((name, total, twin_total))
        width = max(len(row) for row, _ in rows)
        print(f"== {name}, the trainer's training step, batch {args.batch}")
        for row, ops in rows:
            detail = ", ".join(f"{op} {count}" for op, count in ops.most_common())
            print(f"{row:<{width}}  {sum(ops.values()):4d}  {detail}")
        if counted - trainer_step:  # the layer-by-layer math holds operations the trainer's step does not run
            print(f"counted layer by layer but not in the trainer's step: {dict(counted - trainer_step)}")
        print(f"{name.upper()}: xpcnn {total}, PyTorch eager {twin_total}\n")
    width = max(len("model"), *(len(name) for name in names))
    print(f"== all models, operations in the trainer's training step, batch {args.batch}")
    print(f"{'model':<{width}}  {'xpcnn':>6}  {'torch eager':>11}  {'ratio':>6}")
    for name, total, twin_total in totals:
        print(f"{name:<{width}}  {total:>6}  {twin_total:>11}  {total / twin_total:>6.2f}")


if __name__ == "__main__":
    main()
