#!/usr/bin/env python3
"""Profile a CuPy training step: host time and GPU time per step, CuPy's fused kernels on and off.

``cupyx.profiler.benchmark`` times each call on the host (Python and kernel
launches) and on the GPU (CUDA events around it).  When the GPU time is about
the host time, the GPU waits for Python: the step is bound by launches, and
fewer launches are what makes it faster.  Also prints each layer's host time
for one step, measured the same way.

    python scripts/profile_step.py [--model convnet] [--batch 128] [--repeat 200] [--cprofile N] [--graph]

``--cprofile N`` also prints the N Python functions with the most own time over
``--repeat`` steps (fused kernels on), and ``--graph`` tries to capture a step
in a CUDA graph (CuPy refuses some library calls during capture).
"""

import argparse
import cProfile
import pstats
import statistics

import numpy as np

try:
    from cupyx.profiler import benchmark
except ImportError:
    raise SystemExit("error: profiling a CuPy step needs CuPy and a GPU (pip install '.[cuda12]')") from None

from xpcnn.backends.backend import get_backend
from xpcnn.models import MODELS, build
from xpcnn.nn import CrossEntropyLoss
from xpcnn.ops import fastpath
from xpcnn.optim import SGD


def microseconds(times) -> float:
    return statistics.median(np.ravel(times)) * 1e6


def training_step(model_name: str, batch: int):
    """A closure running one training step of ``model_name`` on CuPy (SGD with the training defaults)."""
    backend = get_backend("cupy")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((batch, 1, 28, 28)), backend.xp.float32)
    y = backend.asarray(rng.integers(0, 10, batch))
    model = build(model_name, seed=0).to(backend)
    model.set_generator(backend.generator(0))
    loss_fn = CrossEntropyLoss(check_labels=False)
    optimizer = SGD(model, 0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        optimizer.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step()

    return step, model, loss_fn, optimizer, x, y


def profile(model_name: str, batch: int, repeat: int, enabled: bool) -> None:
    fastpath.ENABLED = enabled
    step, model, loss_fn, optimizer, x, y = training_step(model_name, batch)

    result = benchmark(step, n_repeat=repeat, n_warmup=20)
    label = "fused kernels" if enabled else "reference path"
    host, gpu = microseconds(result.cpu_times), microseconds(result.gpu_times)
    print(
        f"{model_name} batch {batch}, {label}: host {host:,.0f} us, GPU {gpu:,.0f} us per step "
        f"({batch / gpu * 1e6:,.0f} img/s)"
    )
    h = x
    for layer in model:
        timing = benchmark(layer.forward, (h,), n_repeat=repeat // 4, n_warmup=5)
        h = layer.forward(h)
        print(f"    forward {layer!r}: host {microseconds(timing.cpu_times):,.0f} us")
    timing = benchmark(lambda: (loss_fn.forward(h, y), loss_fn.backward()), n_repeat=repeat // 4, n_warmup=5)
    print(f"    loss: host {microseconds(timing.cpu_times):,.0f} us")
    grad = loss_fn.backward()
    for layer in reversed(list(model)):
        # Cleared before each call, as in a training step: a second backward would add to the gradients.
        timing = benchmark(
            lambda layer=layer, grad=grad: (layer.zero_grad(), layer.backward(grad)), n_repeat=repeat // 4, n_warmup=5
        )
        grad = layer.backward(grad)
        print(f"    backward {layer!r}: host {microseconds(timing.cpu_times):,.0f} us")
    timing = benchmark(optimizer.step, n_repeat=repeat // 4, n_warmup=5)
    print(f"    optimizer step: host {microseconds(timing.cpu_times):,.0f} us")


def python_profile(model_name: str, batch: int, repeat: int, top: int) -> None:
    """The Python functions with the most own time over ``repeat`` steps, fused kernels on."""
    fastpath.ENABLED = True
    step = training_step(model_name, batch)[0]
    for _ in range(20):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeat):
        step()
    profiler.disable()
    print(f"{model_name} batch {batch}: Python functions by own time over {repeat} steps")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def try_graph(model_name: str, batch: int) -> None:
    """Capture one step in a CUDA graph and replay it, or say what refused."""
    import cupy

    fastpath.ENABLED = True
    step = training_step(model_name, batch)[0]
    for _ in range(3):
        step()
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            stream.begin_capture()
            try:
                step()
            finally:
                graph = stream.end_capture()
        result = benchmark(graph.launch, n_repeat=200, n_warmup=10)
        gpu = microseconds(result.gpu_times)
        print(f"{model_name} graph: replay GPU {gpu:,.0f} us per step ({batch / gpu * 1e6:,.0f} img/s)")
    except Exception as error:  # report what CuPy refused, whatever it was
        print(f"{model_name} graph: capture failed: {type(error).__name__}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--graph", action="store_true")
    args = parser.parse_args()
    for model_name in args.model or ["convnet"]:
        for enabled in (True, False):
            profile(model_name, args.batch, args.repeat, enabled)
        if args.cprofile:
            python_profile(model_name, args.batch, args.repeat, args.cprofile)
        if args.graph:
            try_graph(model_name, args.batch)


if __name__ == "__main__":
    main()
