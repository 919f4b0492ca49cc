"""Throughput and memory benchmark: xpcnn on each backend beside PyTorch, in one run.

Each case (framework, backend, model) runs in a fresh Python process with the
same thread count, so that peak memory is per case and no case warms another's
caches or allocator.  A case measures:

* training images/s: forward + loss + backward + optimiser step (SGD, momentum
  0.9, lr 0.01) on float32 batches of ``train_batch`` images;
* inference images/s: evaluation-mode forward on batches of ``infer_batch``;
* peak resident memory of the process (and peak device memory on a GPU).

Warm-up steps are excluded; each figure is the median of ``repeats`` timed
runs of ``steps`` steps.  The device is synchronised only at the end of each
timed run.  Where torch is installed the same architecture, batch, optimiser
and thread count run under torch (eager) in the same benchmark, and the table
shows the ratio xpcnn / torch on the device the xpcnn case ran on (xpcnn on
torch or jax picks CUDA where that library can use a GPU, as ``get_backend``
does with ``device="auto"``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .models import build

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Case:
    framework: str  # "xpcnn" or "torch"
    backend: str  # xpcnn backend name (its default device), or torch device ("cpu", "cuda")
    model: str

    @property
    def label(self) -> str:
        return f"{self.framework}:{self.backend}:{self.model}"

    @classmethod
    def parse(cls, label: str) -> Case:
        framework, backend, model = label.split(":")
        return cls(framework, backend, model)


@dataclass(frozen=True)
class Settings:
    train_batch: int = 128
    infer_batch: int = 1000
    steps: int = 20
    repeats: int = 5
    warmup: int = 3
    threads: int = 2
    tf32: bool = False  # TF32 float32 matmuls (and torch's cuDNN convolutions) on NVIDIA GPUs, for both sides


def _timed_runs(step, sync, settings: Settings, images_per_step: int) -> list[float]:
    """Images/s of ``repeats`` runs of ``steps`` calls to ``step``, after ``warmup`` calls."""
    for _ in range(settings.warmup):
        step()
    sync()
    rates = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        for _ in range(settings.steps):
            step()
        sync()
        rates.append(images_per_step * settings.steps / (time.perf_counter() - start))
    return rates


def _batches(rng: np.random.Generator, batch: int, count: int = 4):
    """A few fixed float32 batches (batch, 1, 28, 28) and int64 labels, on the host."""
    return [
        (rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
        for _ in range(count)
    ]


def run_xpcnn_case(case: Case, settings: Settings) -> dict:
    """Measure xpcnn's ``case.model`` on backend ``case.backend``."""
    from .backend import get_backend
    from .nn import CrossEntropyLoss
    from .optim import SGD

    backend = get_backend(case.backend)
    rng = np.random.default_rng(0)
    with backend.activate():
        model = build(case.model, seed=0).to(backend)
        model.set_generator(backend.generator(0))
        loss_fn = CrossEntropyLoss(check_labels=False)
        optimizer = SGD(model, lr=0.01, momentum=0.9)
        train_data = [(backend.asarray(x), backend.asarray(y)) for x, y in _batches(rng, settings.train_batch)]
        infer_data = [backend.asarray(x) for x, _ in _batches(rng, settings.infer_batch, 2)]
        position = {"train": 0, "infer": 0}

        def train_step():
            x, y = train_data[position["train"] % len(train_data)]
            position["train"] += 1
            loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward(), input_grad=False)
            optimizer.step()

        def infer_step():
            model.forward(infer_data[position["infer"] % len(infer_data)])
            position["infer"] += 1

        model.train()
        train_rates = _timed_runs(train_step, backend.synchronize, settings, settings.train_batch)
        model.zero_cache()
        model.eval()
        infer_rates = _timed_runs(infer_step, backend.synchronize, settings, settings.infer_batch)
    return {
        "device": backend.device_name,
        "train_runs": train_rates,
        "infer_runs": infer_rates,
        "device_peak_mib": _device_peak_mib(backend),
    }


def _device_peak_mib(backend) -> float | None:
    """Peak GPU memory of the run in MiB (None on the CPU).

    CuPy: what its memory pool holds (it keeps its high-water mark); torch: its
    allocator's peak; JAX: the device's ``peak_bytes_in_use``.
    """
    if not backend.is_gpu:
        return None
    if backend.name == "cupy":
        import cupy

        return cupy.get_default_memory_pool().total_bytes() / 2**20
    if backend.name == "torch":
        import torch

        return torch.cuda.max_memory_allocated(backend.device) / 2**20
    return backend.device.memory_stats()["peak_bytes_in_use"] / 2**20


def torch_twin(model):
    """The same architecture and weights as an xpcnn ``Sequential``, as a ``torch.nn.Sequential``."""
    import torch

    from . import nn

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
            raise TypeError(f"no torch twin for {layer!r}")
    twin = torch.nn.Sequential(*layers)
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return twin


def run_torch_case(case: Case, settings: Settings) -> dict:
    """Measure the same architecture under PyTorch (eager) on ``case.backend`` ("cpu" or "cuda")."""
    import torch

    torch.set_num_threads(settings.threads)
    device = torch.device(case.backend)
    model = torch_twin(build(case.model, seed=0)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    train_data = [
        (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for x, y in _batches(rng, settings.train_batch)
    ]
    infer_data = [torch.from_numpy(x).to(device) for x, _ in _batches(rng, settings.infer_batch, 2)]
    position = {"train": 0, "infer": 0}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        x, y = train_data[position["train"] % len(train_data)]
        position["train"] += 1
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode():
            model(infer_data[position["infer"] % len(infer_data)])
        position["infer"] += 1

    model.train()
    train_rates = _timed_runs(train_step, sync, settings, settings.train_batch)
    model.eval()
    infer_rates = _timed_runs(infer_step, sync, settings, settings.infer_batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"device": str(device), "train_runs": train_rates, "infer_runs": infer_rates, "device_peak_mib": peak}


def run_case(case: Case, settings: Settings) -> dict:
    """Run one case in this process and return its figures."""
    from .backend import set_tf32

    # Set either way, so that xpcnn and torch (whose cuDNN convolutions default to TF32) compute alike.
    set_tf32(settings.tf32)
    runner = run_torch_case if case.framework == "torch" else run_xpcnn_case
    result = runner(case, settings)
    return {
        **asdict(case),
        "train_images_per_second": statistics.median(result["train_runs"]),
        "infer_images_per_second": statistics.median(result["infer_runs"]),
        "peak_rss_mib": own_peak_rss_mib(),
        **result,
    }


def run_case_in_subprocess(case: Case, settings: Settings) -> dict:
    """Run one case in a fresh interpreter with the thread count fixed before any library loads."""
    env = dict(os.environ, **{name: str(settings.threads) for name in THREAD_VARIABLES})
    command = [sys.executable, "-m", "xpcnn.bench", case.label, json.dumps(asdict(settings))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**asdict(case), "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def xpcnn_cases(backends: list[str], models: list[str]) -> list[Case]:
    """xpcnn on each backend (on the device ``get_backend`` picks for it), for each model."""
    return [Case("xpcnn", backend, model) for model in models for backend in backends]


def twin_cases(results: list[dict]) -> list[Case]:
    """torch eager on the kind of device (cpu or cuda) each successful xpcnn case ran on, same model.

    The twins are chosen after the xpcnn cases have run: which device torch or
    JAX picks is known only in the case's own process (asking JAX here would
    initialise it on the GPU and hold memory that the cases need).
    """
    cases = []
    for row in results:
        if row["framework"] == "xpcnn" and "error" not in row:
            twin = Case("torch", row["device"].split(":")[0], row["model"])
            if twin not in cases:
                cases.append(twin)
    return cases


def add_ratios(results: list[dict]) -> None:
    """Set ``train_ratio`` / ``infer_ratio`` (xpcnn / torch on the same kind of device, same model) where both ran."""
    torch_rows = {(r["backend"], r["model"]): r for r in results if r["framework"] == "torch" and "error" not in r}
    for row in results:
        if row["framework"] != "xpcnn" or "error" in row:
            continue
        twin = torch_rows.get((row["device"].split(":")[0], row["model"]))
        if twin:
            row["train_ratio"] = row["train_images_per_second"] / twin["train_images_per_second"]
            row["infer_ratio"] = row["infer_images_per_second"] / twin["infer_images_per_second"]


def format_progress(result: dict) -> str:
    """One line for a finished case, printed as the benchmark goes (a run cut short keeps them)."""
    label = Case(result["framework"], result["backend"], result["model"]).label
    if "error" in result:
        return f"{label}: failed: {result['error']}"
    return (
        f"{label} on {result['device']}: train {result['train_images_per_second']:,.0f} img/s, "
        f"infer {result['infer_images_per_second']:,.0f} img/s"
    )


def format_table(results: list[dict]) -> str:
    """A plain-text table of the results (medians; ratios are xpcnn / torch)."""
    header = f"{'model':<10} {'framework':<9} {'backend':<17} {'device':<7} {'train img/s':>12} {'ratio':>6} "
    header += f"{'infer img/s':>12} {'ratio':>6} {'peak RSS MiB':>13} {'device MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<10} {r['framework']:<9} {r['backend']:<17} failed: {r['error']}")
            continue
        device = f"{r['device_peak_mib']:.0f}" if r.get("device_peak_mib") is not None else "-"
        train_ratio = f"{r['train_ratio']:.2f}" if "train_ratio" in r else ""
        infer_ratio = f"{r['infer_ratio']:.2f}" if "infer_ratio" in r else ""
        lines.append(
            f"{r['model']:<10} {r['framework']:<9} {r['backend']:<17} {r['device']:<7} "
            f"{r['train_images_per_second']:>12,.0f} "
            f"{train_ratio:>6} {r['infer_images_per_second']:>12,.0f} {infer_ratio:>6} "
            f"{r['peak_rss_mib']:>13,.0f} {device:>11}"
        )
    return "\n".join(lines)


def machine_description(threads: int) -> dict:
    """What the figures were measured on."""
    import numpy

    from . import __version__
    from .backend import gpu_names

    info = {
        "xpcnn": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "gpus": gpu_names(),
    }
    for package in ("torch", "jax"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def own_peak_rss_mib() -> float:
    """Peak resident memory of this process's own program, in MiB.

    Linux's VmHWM where there is one: ``ru_maxrss`` also counts the memory of
    the parent this process was spawned from (exec carries the old image's
    high-water mark over), so a child of a large test or benchmark process
    would report its parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Runs the xpcnn command line, then writes its own peak memory to the file named first.
_TRAIN_AND_REPORT_PEAK = """
import sys
from xpcnn.bench import own_peak_rss_mib
from xpcnn.cli import main
try:
    main(sys.argv[2:], prog_name="xpcnn")
finally:
    with open(sys.argv[1], "w") as peak:
        peak.write(str(own_peak_rss_mib()))
"""


def full_run(data_dir: str, model: str, device: str, threads: int, tf32: bool = False) -> dict:
    """Train ``model`` for one epoch on the MNIST files in ``data_dir`` in a child process.

    Returns the child's own peak resident memory, wall time and final history record.
    """
    import tempfile

    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", _TRAIN_AND_REPORT_PEAK, f"{out}/peak"]
        command += ["train", "--model", model, "--epochs", "1", "--device", device]
        command += ["--data-dir", data_dir, "--out", f"{out}/run"] + (["--tf32"] if tf32 else [])
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            return {"model": model, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        record = json.loads(open(f"{out}/run/history.json").read())[-1]
        peak = float(open(f"{out}/peak").read())
    return {"model": model, "device": device, "peak_rss_mib": peak, "wall_seconds": seconds, **record}


def main_case(argv: list[str]) -> None:
    """Entry point of the per-case subprocess: ``python -m xpcnn.bench CASE SETTINGS_JSON``."""
    case, settings = Case.parse(argv[0]), Settings(**json.loads(argv[1]))
    print(json.dumps(run_case(case, settings)))


if __name__ == "__main__":
    main_case(sys.argv[1:])
