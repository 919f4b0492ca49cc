#!/usr/bin/env python3
"""Data parallelism, measured here and modelled for GPUs (docs/distributed.md).

    python scripts/bench_data_parallel.py measure [--model convnet] [--batch 128] [--steps 30] [--backend numpy]
    python scripts/bench_data_parallel.py model

``measure`` times training steps of one global batch on 1 rank (all the CPU threads) and on 2 ranks (xpcnn's
launcher, half the threads each, half the batch each) and the flat gradient's all-reduce alone; on a
2-core machine that shows what the communication costs and whether the step splits, not how it scales.
``model`` prints, for every model in xpcnn/models.py, the bytes all-reduced per step and a ring
all-reduce's time on NVLink and on a 100 Gb/s network, and, for the models whose one-GPU step was
measured on the H100 (docs/benchmarks.md), the predicted efficiency at 8 and 64 GPUs with batch 128 each.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from xpcnn.apps.launch import launch
from xpcnn.backends import distributed
from xpcnn.backends.backend import get_backend
from xpcnn.backends.ranks import join
from xpcnn.data.device_data import DeviceSplit, Normalization
from xpcnn.models import MODELS, build
from xpcnn.nn import CrossEntropyLoss, _BatchNorm
from xpcnn.training.config import TrainConfig, make_optimizer
from xpcnn.training.train import LayerSteps

# ---------------------------------------------------------------- the model

BYTES_PER_VALUE = 4  # float32 gradients
NVLINK = 450e9  # bytes/s per direction, H100 NVLink 4 (18 links)
NETWORK = 100e9 / 8  # bytes/s: a 100 Gb/s link
# Per-hop latencies of one ring step (assumed, NCCL-like): small messages on NVLink, and across a network.
NVLINK_HOP = 2e-6
NETWORK_HOP = 10e-6
# One-GPU training step times at batch 128 on the H100 (docs/benchmarks.md, CuPy, float32):
# convnet and seed from the profile (host time per step), convnet-bn from the bench's images/s.
H100_STEP = {"convnet": (1.052e-3, 1.115e-3), "seed": (0.600e-3, 0.639e-3), "convnet-bn": (128 / 80_532,) * 2}


def ring_seconds(size_bytes: float, ranks: int, bandwidth: float, hop: float) -> float:
    """A ring all-reduce: 2(N-1)/N * bytes / bandwidth + 2(N-1) hops of latency."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size_bytes / bandwidth + 2 * (ranks - 1) * hop


def tree_seconds(size_bytes: float, ranks: int, bandwidth: float, hop: float) -> float:
    """A tree (or recursive-halving) all-reduce's latency bound: 2 log2(N) hops, the same bandwidth term."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size_bytes / bandwidth + 2 * math.ceil(math.log2(ranks)) * hop


def link(ranks: int) -> tuple[float, float]:
    """(bandwidth, hop latency) of the slowest link of ``ranks`` GPUs: NVLink inside an 8-GPU box, else the network."""
    return (NVLINK, NVLINK_HOP) if ranks <= 8 else (NETWORK, NETWORK_HOP)


def model_table() -> list[dict]:
    rows = []
    for name in MODELS:
        net = build(name)
        size = net.num_parameters() * BYTES_PER_VALUE
        norms = sum(isinstance(layer, _BatchNorm) for layer in net)
        row = {
            "model": name,
            "parameters": net.num_parameters(),
            "bytes": size,
            "batch_norm_layers": norms,
            "ring_nvlink_8_us": ring_seconds(size, 8, NVLINK, NVLINK_HOP) * 1e6,
            "ring_network_64_us": ring_seconds(size, 64, NETWORK, NETWORK_HOP) * 1e6,
            "tree_network_64_us": tree_seconds(size, 64, NETWORK, NETWORK_HOP) * 1e6,
        }
        for ranks, algorithm in ((8, ring_seconds), (64, ring_seconds), (64, tree_seconds)):
            bandwidth, hop = link(ranks)
            key = f"{ranks}_{algorithm.__name__.split('_')[0]}"
            gradient = algorithm(size, ranks, bandwidth, hop)
            # Synchronised batch norm: 3 latency-bound all-reduces per layer (two forward, one backward).
            statistics = 3 * norms * algorithm(0, ranks, bandwidth, hop)
            row[f"comm_{key}_us"] = (gradient + statistics) * 1e6
            if name in H100_STEP:  # no overlap: the all-reduces wait for the backward pass, the update for them
                row[f"efficiency_{key}"] = sorted(step / (step + gradient + statistics) for step in H100_STEP[name])
        rows.append(row)
    return rows


def print_model() -> None:
    def percent(row, key):
        if f"efficiency_{key}" not in row:
            return "-"
        low, high = (round(100 * e) for e in row[f"efficiency_{key}"])
        return f"{low}%" if low == high else f"{low}-{high}%"

    print(
        "| model | parameters | bytes per step | ring, 8 on NVLink | ring / tree, 64 on 100 Gb/s "
        "| all of a step's all-reduces, 8 / 64 ring / 64 tree | efficiency at 8 | at 64, ring / tree |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for row in model_table():
        print(
            f"| {row['model']} | {row['parameters']:,} | {row['bytes']:,} | {row['ring_nvlink_8_us']:.1f} us "
            f"| {row['ring_network_64_us']:,.0f} / {row['tree_network_64_us']:.0f} us "
            f"| {row['comm_8_ring_us']:.0f} / {row['comm_64_ring_us']:,.0f} / {row['comm_64_tree_us']:,.0f} us "
            f"| {percent(row, '8_ring')} | {percent(row, '64_ring')} / {percent(row, '64_tree')} |"
        )


# ---------------------------------------------------------------- the measurement


def time_rank(model: str, batch: int, steps: int, backend_name: str) -> dict:
    """Seconds per step of one global ``batch`` on this rank's share, and of the gradient's all-reduce alone."""
    backend = get_backend(backend_name, "cpu")
    communicator = join(backend)
    net = build(model).to(backend)
    net.set_communicator(communicator)
    optimizer = make_optimizer(TrainConfig(model=model), net)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8), rng.integers(0, 10, batch)
    split = DeviceSplit.from_host(backend, images, labels, Normalization.of(images))
    runner = LayerSteps(net, CrossEntropyLoss(check_labels=False), optimizer, backend, 0)
    runner.communicator = communicator
    runner.start_epoch(0, 0)
    lo, hi = distributed.shard_bounds(0, batch, communicator.rank, communicator.world_size)
    shard = backend.asarray(np.arange(lo, hi))

    def timed(work, count):
        communicator.barrier()
        started = time.perf_counter()
        for _ in range(count):
            work()
        communicator.barrier()
        return (time.perf_counter() - started) / count

    timed(lambda: runner.train_step(split.images, split.labels, shard, 0), 3)  # warm-up
    step = timed(lambda: runner.train_step(split.images, split.labels, shard, 0), steps)
    flat = np.zeros(net.num_parameters(), np.float32)
    reduce = timed(lambda: communicator.all_reduce_mean(flat), steps)
    communicator.close()
    return {"ranks": communicator.world_size, "step_s": step, "steps_per_s": 1 / step, "all_reduce_s": reduce}


def measure(args) -> None:
    results = []
    for ranks in (1, 2):
        command = [sys.executable, __file__, "rank", args.model, str(args.batch), str(args.steps), args.backend]
        if ranks == 1:
            threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
            done = subprocess.run(command, env={**os.environ, **threads}, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
            results.append(json.loads(done.stdout.splitlines()[-1]))
        else:
            output = f"/tmp/xpcnn-bench-dp-{os.getpid()}.json"
            status = launch(ranks, [*command, output])
            assert status == 0
            with open(output) as file:
                results.append(json.load(file))
            os.remove(output)
    print(json.dumps({"model": args.model, "global_batch": args.batch, "cpus": os.cpu_count(), "results": results}))


def positive(text: str) -> int:
    """An argparse type: an int of at least 2 (a batch split over 2 ranks; 2 steps or more to time)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def main() -> None:
    if sys.argv[1:2] == ["rank"]:
        model, batch, steps, backend_name, *output = sys.argv[2:]
        result = time_rank(model, int(batch), int(steps), backend_name)
        if output and int(os.environ.get("XPCNN_RANK", "0")) == 0:
            with open(output[0], "w") as file:
                json.dump(result, file)
        elif not output:
            print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    timing = sub.add_parser("measure")
    timing.add_argument("--model", choices=list(MODELS), default="convnet")
    timing.add_argument("--batch", type=positive, default=128, help="global batch, split over the ranks")
    timing.add_argument("--steps", type=positive, default=30)
    timing.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    sub.add_parser("model")
    args = parser.parse_args()
    if args.what == "measure":
        measure(args)
    else:
        print_model()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the table's reader went away (| head): quietly, as SIGPIPE would end it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
