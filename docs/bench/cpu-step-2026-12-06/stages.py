# Scratch measurement of 2026-12-06 (docs/bench/cpu-step-2026-12-06/results.txt); run from the repository root.
"""Time the compiled epoch program of resnet-small variants (batch 64, the fashion recipe's optimiser), 2 threads."""
import statistics, sys, time
import numpy as np
from xpcnn import models
from xpcnn.backends.backend import get_backend
from xpcnn.data.augment import Augmentation
from xpcnn.nn import CrossEntropyLoss, Sequential, Flatten, Linear, OUTPUT_GAIN
from xpcnn.optim import SGD
from xpcnn.ops import fastpath_jax
from xpcnn.training.train import step_runner

B, STEPS, REPEATS = 64, 200, 7
backend = get_backend("jax", "cpu")
xp = backend.xp

def prefix(n, channels, size):
    m = models.resnet_small(0, dropout=0.0)
    layers = m.layers[:n] + [Flatten(), Linear(channels * size * size, 10, rng=np.random.default_rng(0), gain=OUTPUT_GAIN)]
    return Sequential(*layers)

def time_model(name, model, aug):
    rng = np.random.default_rng(0)
    n = B * 16
    with backend.activate():
        model = model.to(backend)
        model.set_generator(backend.generator(0))
        images = backend.asarray(rng.standard_normal((n, 1, 28, 28)).astype(np.float32))
        labels = backend.asarray(rng.integers(0, 10, n).astype(np.int64))
        opt = SGD(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        runner = step_runner(model, CrossEntropyLoss(check_labels=False), opt, backend, 0,
                             Augmentation(flip=True, crop=2) if aug else None)
        runner.start_epoch(0, 0)
        order = backend.asarray(np.tile(np.arange(n), STEPS // 16 + 1))
        lrs = runner.learning_rates([0.01] * len(order))
        sums = [xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.int64)]
        def run():
            s = runner.train_steps(images, labels, order, lrs, 0, STEPS, B, *sums)
            s[0].block_until_ready()
        run()
    RUNS[name] = (run, [])

RUNS = {}
def report():
    for _ in range(REPEATS):
        for name, (run, times) in RUNS.items():
            with backend.activate():
                t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    for name, (run, times) in RUNS.items():
        ms = [t / STEPS * 1e3 for t in times]
        print(f"{name:40s} {statistics.median(ms):7.2f} ms/step (min {min(ms):.2f}, max {max(ms):.2f})", flush=True)

which = sys.argv[1:] or ["full", "noaug", "stem-xla", "p4", "p5", "p8", "p9"]
for w in which:
    if w == "full": time_model(w, models.resnet_small(0, dropout=0.0), True)
    if w == "noaug": time_model(w, models.resnet_small(0, dropout=0.0), False)
    if w == "stem-xla":
        fastpath_jax.NARROW_PATCHES = 0
        time_model(w, models.resnet_small(0, dropout=0.0), True)
        fastpath_jax.NARROW_PATCHES = 25  # compiled already: the variant keeps XLA's convolution
    if w == "p4": time_model("stem+pool (4 layers)", prefix(4, 32, 14), True)
    if w == "p5": time_model("+block14 (5 layers)", prefix(5, 32, 14), True)
    if w == "p8": time_model("+conv 32->64, pool, BN, ReLU (9 layers)", prefix(9, 64, 7), True)
    if w == "p9": time_model("+block7 (10 layers)", prefix(10, 64, 7), True)
    if w.startswith("w"):  # added 2026-12-06, night: w48 is resnet-small at width 48 (fashion-candidates-2026-12-06j)
        time_model(w, models.resnet_small(0, width=int(w[1:]), dropout=0.0), True)
report()
