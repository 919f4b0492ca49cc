"""The benchmark's sessions: each xpcnn case beside its PyTorch eager twin, two processes, timed runs interleaved.

Where torch is installed, each xpcnn case runs beside a twin: the same
architecture, weights, batch, optimiser and thread count under torch (eager),
on the kind of device the xpcnn case ran on (xpcnn on torch or jax picks CUDA
where that library can use a GPU, as ``get_backend`` does with
``device="auto"``).  Both processes (:mod:`.cases`) stay up, warmed up, and the
parent asks them in turn for one timed run of ``steps`` steps each: xpcnn,
torch, xpcnn, torch, ... ``repeats`` times for training, then for inference.
A slow spell of a shared machine then hits both sides of a pair, and the ratio
xpcnn / torch is taken per pair (:mod:`.formatting`): the table shows the
median of the ``repeats`` per-pair ratios and their spread (the lowest and
highest).  Also here: the full-epoch memory run, one ``xpcnn train`` epoch in
a child process that reports its own peak memory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from .cases import PHASES, Case, Settings
from .formatting import add_epoch_ratios, add_ratios, pair_ratios

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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
        except BaseException:  # a failed case, or a signal while it starts: no process is left running
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
            status = self._process.wait()
            self._stderr.seek(0)
            said = self._stderr.read().strip().splitlines()
            raise CaseFailed(_last_words(said, status))
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # cut short (a killed process) or a library's own print: the case is lost
            raise CaseFailed(f"not a reply from the case's process: {line.strip()[:80]!r}") from None

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._stderr.close()


def _last_words(lines: list[str], status: int) -> str:
    """Why a process ended, from its stderr ``lines`` and exit ``status``: the last line, without the "Error: " of
    a command or the module path of xpcnn's own exception; or the signal that killed it."""
    if not lines:
        return f"killed by signal {-status}" if status < 0 else f"exit status {status}, no output"
    last = lines[-1].removeprefix("Error: ")
    return re.sub(r"^xpcnn\.[\w.]*\.(\w+): ", "", last)


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
            return {"model": model, "error": _last_words(done.stderr.strip().splitlines(), done.returncode)}
        record = json.loads(open(f"{out}/run/history.json").read())[-1]
        peak = float(open(f"{out}/peak").read())
    return {"model": model, "device": device, "peak_rss_mib": peak, "wall_seconds": seconds, **record}
