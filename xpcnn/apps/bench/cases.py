"""Throughput and memory benchmark: xpcnn on each backend beside PyTorch, in one run.

One job, though long: the xpcnn-beside-PyTorch benchmark, whose two processes per
case and the protocol between them belong together.

Each case (framework, backend, model) runs in its own Python process with the
same thread count, fixed before any library loads, so that peak memory is per
case and no case warms another's caches or allocator.  A case measures:

* training images/s: forward + loss + backward + optimiser step (SGD, momentum
  0.9, lr 0.01) on float32 batches of ``train_batch`` images;
* inference images/s: evaluation-mode forward on batches of ``infer_batch``;
* peak resident memory of the process (and peak device memory on a GPU).

On JAX both steps are the compiled ones of :mod:`xpcnn.compiled` unless
``eager`` (the training step gathers its batch from a small device dataset,
as in training; the inference step also computes the loss and
predictions); each row says which (``compiled``).  Compiled, each timed
training run of ``steps`` steps one program at a time is followed at once by
one of the epoch program (the ``steps`` steps as one program, as training runs
them): ``train_epoch_*`` in the row, its ratio to the step programs per pair.

Where torch is installed, each xpcnn case runs beside a twin: the same
architecture, weights, batch, optimiser and thread count under torch (eager),
on the kind of device the xpcnn case ran on (xpcnn on torch or jax picks CUDA
where that library can use a GPU, as ``get_backend`` does with
``device="auto"``).  Both processes stay up, warmed up, and the parent asks
them in turn for one timed run of ``steps`` steps each: xpcnn, torch, xpcnn,
torch, ... ``repeats`` times for training, then for inference.  A slow spell
of a shared machine then hits both sides of a pair, and the ratio xpcnn /
torch is taken per pair: the table shows the median of the ``repeats``
per-pair ratios and their spread (the lowest and highest).  Warm-up steps are
excluded; the device is synchronised only at the end of each timed run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from ...backends.diagnostics import device_peak_mib
from ...models import build
from ...training.step import compiles
from ...training.train import LayerSteps
from ..export import torch_twin

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PHASES = ("train", "infer")
RATIO_SPREAD = "min and max of the per-pair ratios"


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
    eager: bool = False  # JAX: time the step run eagerly instead of the compiled one


class Session:
    """One case set up in this process: times one run of ``steps`` steps of a phase on request."""

    def __init__(
        self,
        device: str,
        steps: dict,
        modes: dict,
        sync,
        device_peak_mib,
        settings: Settings,
        activate=None,
        compiled: bool = False,
        epoch_program=None,
    ):
        """``compiled``: whether the steps are compiled programs (JAX's), not eager operations;
        ``epoch_program(count)``, if given, runs ``count`` training steps as one program."""
        self.device, self.compiled, self._epoch_program = device, compiled, epoch_program
        self._steps, self._modes, self._sync = steps, modes, sync  # per phase: a step, a switch into that mode
        self.device_peak_mib = device_peak_mib
        self._settings = settings
        self._activate = activate or contextlib.nullcontext
        self._phase = None

    def enter(self, phase: str) -> None:
        """Switch the model into ``phase``'s mode and warm up, unless it is in that phase already."""
        if phase == self._phase:
            return
        with self._activate():
            self._modes[phase]()
            for _ in range(self._settings.warmup):
                self._steps[phase]()
            if phase == "train" and self._epoch_program is not None:
                self._epoch_program(self._settings.steps)  # compiles it
            self._sync()
        self._phase = phase

    def repeat(self, phase: str) -> dict:
        """``{"rate": images/s}`` of one timed run of ``steps`` steps of ``phase`` ("train" or "infer");
        training with an epoch program, also ``"epoch_rate"``: those steps as one program, timed right after."""
        self.enter(phase)
        batch = self._settings.train_batch if phase == "train" else self._settings.infer_batch
        step, steps = self._steps[phase], self._settings.steps
        with self._activate():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            self._sync()
            rates = {"rate": batch * steps / (time.perf_counter() - start)}
            if phase == "train" and self._epoch_program is not None:
                start = time.perf_counter()
                self._epoch_program(steps)
                self._sync()
                rates["epoch_rate"] = batch * steps / (time.perf_counter() - start)
        return rates


def _batches(rng: np.random.Generator, batch: int, count: int = 4):
    """A few fixed float32 batches (batch, 1, 28, 28) and int64 labels, on the host."""
    return [
        (rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
        for _ in range(count)
    ]


def _xpcnn_session(case: Case, settings: Settings) -> Session:
    """xpcnn's ``case.model`` on backend ``case.backend``."""
    from ...backends.backend import get_backend
    from ...nn import CrossEntropyLoss
    from ...optim import SGD

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
    compiled = compiles(backend.name, settings.eager)
    train_step, infer_step, epoch_program = _steps(
        backend, model, loss_fn, optimizer, train_data, infer_data, position, compiled, settings.steps
    )

    def to_eval():
        model.zero_cache()
        model.eval()

    return Session(
        backend.device_name,
        {"train": train_step, "infer": infer_step},
        {"train": model.train, "infer": to_eval},
        backend.synchronize,
        lambda: device_peak_mib(backend),
        settings,
        backend.activate,
        compiled,
        epoch_program,
    )


def _steps(backend, model, loss_fn, optimizer, train_data, infer_data, position, compiled: bool, steps: int):
    """The training runs' own steps over the same batches: (train_step, infer_step, epoch_program or None).

    The training batches become one device dataset that each step gathers its batch from, as in training;
    the runner is the trainer's (:class:`xpcnn.train.LayerSteps`, or JAX's compiled steps and epoch program).
    """
    xp = backend.xp
    if compiled:
        from ...training.compiled import CompiledSteps

        runner = CompiledSteps(model, loss_fn, optimizer, backend, seed=0)
    else:
        runner = LayerSteps(model, loss_fn, optimizer, backend, seed=0)
    with backend.activate():
        images, labels = xp.concat([x for x, _ in train_data]), xp.concat([y for _, y in train_data])
        size = int(train_data[0][1].shape[0])
        batches = [backend.asarray(np.arange(i * size, (i + 1) * size)) for i in range(len(train_data))]
        infer_labels = xp.zeros(infer_data[0].shape[0], dtype=xp.int64, device=backend.device)
    runner.start_epoch(0, 0)
    epoch_program = None
    if compiled:
        # The epoch program's permutation: the batches in turn, as the step programs take them, for ``steps``
        # steps from any of them.
        turns = steps // len(batches) + 2
        with backend.activate():
            order = xp.concat(batches * turns)
            learning_rates = runner.learning_rates([optimizer.lr] * len(batches) * turns)
            sums = [
                xp.zeros((), dtype=xp.float64, device=backend.device),
                xp.zeros((), dtype=xp.int64, device=backend.device),
            ]

        def run_epoch_program(count: int):
            first = position["train"] % len(batches)  # where the step programs would go on
            position["train"] += count
            sums[:] = runner.train_steps(images, labels, order, learning_rates, first, first + count, size, *sums)

        epoch_program = run_epoch_program

    def train_step():
        step = position["train"]
        position["train"] += 1
        runner.train_step(images, labels, batches[step % len(batches)], step)

    def infer_step():
        x = infer_data[position["infer"] % len(infer_data)]
        position["infer"] += 1
        if not compiled:
            model.forward(x)
            return
        # Kept alive until the next step, so that synchronising waits for it (JAX dispatches asynchronously).
        position["result"] = runner.evaluate_batch(x, infer_labels)

    return train_step, infer_step, epoch_program


def _torch_session(case: Case, settings: Settings) -> Session:
    """The same architecture under PyTorch (eager) on ``case.backend`` ("cpu" or "cuda")."""
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
    on_gpu = device.type == "cuda"

    def sync():
        if on_gpu:
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

    return Session(
        str(device),
        {"train": train_step, "infer": infer_step},
        {"train": model.train, "infer": model.eval},
        sync,
        lambda: torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        settings,
    )


def open_session(case: Case, settings: Settings) -> Session:
    """Set ``case`` up in this process, in the TF32 mode of ``settings``."""
    from ...backends.backend import set_tf32

    # Set either way, so that xpcnn and torch (whose cuDNN convolutions default to TF32) compute alike.
    set_tf32(settings.tf32)
    return (_torch_session if case.framework == "torch" else _xpcnn_session)(case, settings)


def serve(case: Case, settings: Settings, commands: Iterable[str], reply: Callable[[dict], None]) -> None:
    """A case's process: set up and warm up, reply its device, then one reply per command until "finish".

    A command is a phase ("train" or "infer"), answered with :meth:`Session.repeat`'s rates of one timed run;
    "finish" is answered with the process's peak memory.
    """
    session = open_session(case, settings)
    session.enter("train")
    reply({"device": session.device, "compiled": session.compiled})
    for command in commands:
        if command.strip() == "finish":
            break
        reply(session.repeat(command.strip()))
    reply({"peak_rss_mib": own_peak_rss_mib(), "device_peak_mib": session.device_peak_mib()})


class CaseFailed(Exception):
    """A case's process ended early; the message is the last line it wrote to stderr."""


class Worker:
    """A case in its own interpreter, with the thread count fixed before any library loads, serving requests."""

    def __init__(self, case: Case, settings: Settings):
        self.case = case
        env = dict(os.environ, **{name: str(settings.threads) for name in THREAD_VARIABLES})
        self._stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty library cannot block the child
        command = [sys.executable, "-m", "xpcnn.apps.bench.cases", case.label, json.dumps(asdict(settings))]
        self._process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        try:
            hello = self._answer()
        except CaseFailed:
            self.close()
            raise
        self.device, self.compiled = hello["device"], hello["compiled"]

    def ask(self, command: str) -> dict:
        """Send one command and wait for its answer."""
        try:
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: reading says why
        return self._answer()

    def _answer(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            raise CaseFailed((self._stderr.read().strip().splitlines() or ["no output"])[-1])
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._stderr.close()


def xpcnn_cases(backends: list[str], models: list[str]) -> list[Case]:
    """xpcnn on each backend (on the device ``get_backend`` picks for it), for each model."""
    return [Case("xpcnn", backend, model) for model in models for backend in backends]


def twin_case(case: Case, device: str) -> Case:
    """torch eager on the kind of device (cpu or cuda) the xpcnn ``case`` ran on, same model.

    Chosen from the device the case's own process reports: which device torch or
    JAX picks is known only there (asking JAX in the parent would initialise it
    on the GPU and hold memory that the cases need).
    """
    return Case("torch", device.split(":")[0], case.model)


def pair_ratios(xpcnn_runs: list[float], torch_runs: list[float]) -> list[float]:
    """xpcnn / torch for each pair of interleaved timed runs."""
    return [mine / theirs for mine, theirs in zip(xpcnn_runs, torch_runs, strict=True)]


def add_ratios(row: dict, twin: dict) -> None:
    """Set the xpcnn ``row``'s per-pair ratios against its ``twin``, their median and spread (min, max)."""
    for phase in PHASES:
        ratios = pair_ratios(row[f"{phase}_runs"], twin[f"{phase}_runs"])
        row[f"{phase}_ratios"] = ratios
        row[f"{phase}_ratio"] = statistics.median(ratios)
        row[f"{phase}_ratio_min"], row[f"{phase}_ratio_max"] = min(ratios), max(ratios)


def add_epoch_ratios(row: dict) -> None:
    """A compiled row's epoch-program rate (median) and its ratio to the step programs' in the same timed run."""
    epoch_runs = row["train_epoch_runs"]
    row["train_epoch_images_per_second"] = statistics.median(epoch_runs)
    ratios = pair_ratios(epoch_runs, row["train_runs"])
    row["epoch_vs_step_ratios"] = ratios
    row["epoch_vs_step"], row["epoch_vs_step_min"], row["epoch_vs_step_max"] = (
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def run_pair(case: Case, settings: Settings, with_torch: bool) -> list[dict]:
    """Run the xpcnn ``case`` and, ``with_torch``, its twin, timed runs interleaved; a row for each.

    A case that fails gets a row with a one-line ``error``; its partner goes on alone.
    """
    rows, workers = {}, {}
    try:
        for label in ("xpcnn", "torch") if with_torch else ("xpcnn",):
            this = case if label == "xpcnn" else twin_case(case, workers["xpcnn"].device)
            rows[label] = asdict(this) | ({"paired_with": case.label} if label == "torch" else {})
            try:
                workers[label] = Worker(this, settings)
            except CaseFailed as exc:
                rows[label]["error"] = str(exc)
                if label == "xpcnn":
                    return [rows[label]]
        for phase in PHASES:
            for _ in range(settings.repeats):
                for label, worker in list(workers.items()):  # xpcnn, torch, xpcnn, torch, ...
                    try:
                        answer = worker.ask(phase)
                        rows[label].setdefault(f"{phase}_runs", []).append(answer["rate"])
                        if "epoch_rate" in answer:
                            rows[label].setdefault("train_epoch_runs", []).append(answer["epoch_rate"])
                    except CaseFailed as exc:
                        rows[label]["error"] = str(exc)
                        workers.pop(label).close()
        for label, worker in workers.items():
            try:
                final = worker.ask("finish")
            except CaseFailed as exc:
                rows[label]["error"] = str(exc)
                continue
            rows[label].update(
                device=worker.device,
                compiled=worker.compiled,
                train_images_per_second=statistics.median(rows[label]["train_runs"]),
                infer_images_per_second=statistics.median(rows[label]["infer_runs"]),
                **final,
            )
            if "train_epoch_runs" in rows[label]:
                add_epoch_ratios(rows[label])
    finally:
        for worker in workers.values():
            worker.close()
    if with_torch and not any("error" in row for row in rows.values()):
        add_ratios(rows["xpcnn"], rows["torch"])
        if "train_epoch_runs" in rows["xpcnn"]:
            ratios = pair_ratios(rows["xpcnn"]["train_epoch_runs"], rows["torch"]["train_runs"])
            rows["xpcnn"]["train_epoch_ratios"] = ratios
            rows["xpcnn"]["train_epoch_ratio"] = statistics.median(ratios)
            rows["xpcnn"]["train_epoch_ratio_min"], rows["xpcnn"]["train_epoch_ratio_max"] = min(ratios), max(ratios)
    return list(rows.values())


def _ratio(row: dict, phase: str) -> str:
    """``median (min-max)`` of a row's per-pair ratios for ``phase``, or "" where it has none."""
    if f"{phase}_ratio" not in row:
        return ""
    return f"{row[f'{phase}_ratio']:.2f} ({row[f'{phase}_ratio_min']:.2f}-{row[f'{phase}_ratio_max']:.2f})"


def format_progress(result: dict) -> str:
    """One line for a finished case, printed as the benchmark goes (a run cut short keeps them)."""
    label = Case(result["framework"], result["backend"], result["model"]).label
    if "paired_with" in result:
        label += f" (beside {result['paired_with']})"
    if "error" in result:
        return f"{label}: failed: {result['error']}"
    line = (
        f"{label} on {result['device']}: train {result['train_images_per_second']:,.0f} img/s, "
        f"infer {result['infer_images_per_second']:,.0f} img/s"
    )
    if "train_ratio" in result:
        line += f"; vs torch: train {_ratio(result, 'train')}, infer {_ratio(result, 'infer')}"
    if "train_epoch_images_per_second" in result:
        line += (
            f"; epoch program: train {result['train_epoch_images_per_second']:,.0f} img/s, vs the step programs "
            f"{result['epoch_vs_step']:.2f} ({result['epoch_vs_step_min']:.2f}-{result['epoch_vs_step_max']:.2f})"
        )
        if "train_epoch_ratio" in result:
            line += f", vs torch {_ratio(result, 'train_epoch')}"
    return line


def format_table(results: list[dict]) -> str:
    """A plain-text table of the results: medians, and xpcnn / torch as the median (min-max) of per-pair ratios."""
    header = f"{'model':<10} {'framework':<9} {'backend':<17} {'device':<7} {'compiled':<8} "
    header += f"{'train img/s':>12} {'vs torch':>16} "
    header += f"{'infer img/s':>12} {'vs torch':>16} {'peak RSS MiB':>13} {'device MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<10} {r['framework']:<9} {r['backend']:<17} failed: {r['error']}")
            continue
        device = f"{r['device_peak_mib']:.0f}" if r.get("device_peak_mib") is not None else "-"
        compiled = "yes" if r.get("compiled") else "no"
        lines.append(
            f"{r['model']:<10} {r['framework']:<9} {r['backend']:<17} {r['device']:<7} "
            f"{compiled:<8} {r['train_images_per_second']:>12,.0f} {_ratio(r, 'train'):>16} "
            f"{r['infer_images_per_second']:>12,.0f} {_ratio(r, 'infer'):>16} "
            f"{r['peak_rss_mib']:>13,.0f} {device:>11}"
        )
    return "\n".join(lines)


def machine_description(threads: int) -> dict:
    """What the figures were measured on."""
    import numpy

    from ... import __version__
    from ...backends.diagnostics import gpu_names

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
from xpcnn.apps.bench.cases import own_peak_rss_mib
from xpcnn.apps.cli import main
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


def main_worker(argv: list[str]) -> None:
    """Entry point of a case's process: ``python -m xpcnn.bench CASE SETTINGS_JSON``, commands on stdin.

    Answers go to the original stdout, one JSON line each; anything a library prints goes to stderr.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    serve(Case.parse(argv[0]), Settings(**json.loads(argv[1])), sys.stdin, reply)


if __name__ == "__main__":
    main_worker(sys.argv[1:])
