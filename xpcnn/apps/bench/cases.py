"""The benchmark's case protocol: what a timed case is and how it runs, in its own process.

Each case (framework, backend, model) runs in its own Python process with the
same thread count, fixed before any library loads, so that peak memory is per
case and no case warms another's caches or allocator.  A case measures:

* training images/s: forward + loss + backward + optimiser step (SGD, momentum
  0.9, lr 0.01) on float32 batches of ``train_batch`` images;
* inference images/s: evaluation-mode forward on batches of ``infer_batch``;
* peak resident memory of the process (and peak device memory on a GPU).

On JAX both steps are the compiled ones of :mod:`xpcnn.training.compiled` unless
``eager`` (the training step gathers its batch from a small device dataset,
as in training; the inference step also computes the loss and
predictions); each row says which (``compiled``).  Compiled, each timed
training run of ``steps`` steps one program at a time is followed at once by
one of the epoch program (the ``steps`` steps as one program, as training runs
them): ``train_epoch_*`` in the row, its ratio to the step programs per pair.

A case's process (``python -m xpcnn.apps.bench.cases CASE SETTINGS_JSON``) sets
the case up, warms it up, and answers commands on stdin, one JSON line each:
a phase ("train" or "infer") with the rates of one timed run of ``steps``
steps, "finish" with its peak memory.  Warm-up steps are excluded; the device
is synchronised only at the end of each timed run.  :mod:`.sessions` runs the
processes, :mod:`.formatting` turns their answers into ratios and a table.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ...backends.diagnostics import device_peak_mib
from ...models import build
from ...training.train import step_runner
from ..export import torch_twin

PHASES = ("train", "infer")


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
    runner = step_runner(model, loss_fn, optimizer, backend, seed=0, eager=settings.eager)
    train_step, infer_step, epoch_program = _steps(
        backend, model, runner, train_data, infer_data, position, settings.steps
    )

    return Session(
        backend.device_name,
        {"train": train_step, "infer": infer_step},
        {"train": model.train, "infer": model.eval},
        backend.synchronize,
        lambda: device_peak_mib(backend),
        settings,
        backend.activate,
        runner.compiles,
        epoch_program,
    )


def _steps(backend, model, runner, train_data, infer_data, position, steps: int):
    """The training runs' own steps over the same batches: (train_step, infer_step, epoch_program or None).

    The training batches become one device dataset that each step gathers its batch from, as in training;
    ``runner`` is the trainer's (:func:`xpcnn.training.train.step_runner`), and compiled, its epoch program.
    """
    xp, compiled = backend.xp, runner.compiles
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
            learning_rates = runner.learning_rates([runner.optimizer.lr] * len(batches) * turns)
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


def main_worker(argv: list[str]) -> None:
    """Entry point of a case's process: ``python -m xpcnn.apps.bench.cases CASE SETTINGS_JSON``, commands on stdin.

    Answers go to the original stdout, one JSON line each; anything a library prints goes to stderr.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    settings = Settings(**json.loads(argv[1]))
    use_cpus(settings.threads)
    serve(Case.parse(argv[0]), settings, sys.stdin, reply)


def use_cpus(threads: int) -> None:
    """Keep this process on ``threads`` of the CPUs it may use, before JAX or torch loads: XLA sizes its thread
    pool by those CPUs and ignores OMP_NUM_THREADS, so a JAX case would otherwise take every core its torch
    twin is denied.  (Linux; elsewhere the thread variables alone.)"""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


if __name__ == "__main__":
    main_worker(sys.argv[1:])
