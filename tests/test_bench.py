"""The benchmark's pairs and ratios: xpcnn on each backend against torch eager on the same device, interleaved."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import run_onto_a_full_disk

from xpcnn.apps.bench import cases, formatting, sessions
from xpcnn.apps.cli import main
from xpcnn.backends import backend


def test_each_xpcnn_case_gets_a_torch_twin_on_the_device_it_ran_on():
    assert [case.label for case in sessions.xpcnn_cases(["numpy", "jax"], ["seed", "lenet"])] == [
        "xpcnn:numpy:seed",
        "xpcnn:jax:seed",
        "xpcnn:numpy:lenet",
        "xpcnn:jax:lenet",
    ]
    assert sessions.twin_case(cases.Case("xpcnn", "numpy", "seed"), "cpu").label == "torch:cpu:seed"
    assert sessions.twin_case(cases.Case("xpcnn", "jax", "seed"), "cuda:0").label == "torch:cuda:seed"
    assert sessions.twin_case(cases.Case("xpcnn", "cupy", "lenet"), "cuda:1").label == "torch:cuda:lenet"


@pytest.mark.parametrize("reply", ['{"device": "cpu", "comp', "a library's own print"])
def test_a_reply_that_is_not_json_is_a_failed_case_not_a_traceback(reply, monkeypatch):

    real_popen = subprocess.Popen

    def case_that_prints(command, **kwargs):  # in place of the case's process: one line that is not a reply
        return real_popen([sys.executable, "-c", f"print({reply!r})"], **kwargs)

    monkeypatch.setattr(sessions.subprocess, "Popen", case_that_prints)
    with pytest.raises(sessions.CaseFailed, match="not a reply from the case's process"):
        sessions.Worker(cases.Case("xpcnn", "numpy", "seed"), cases.Settings(8, 8, 1, 1, 1, 1, False, False))


def test_ratios_are_per_pair_of_interleaved_runs_with_their_median_and_spread():
    # A slow spell in the second pair slows both sides: the per-pair ratio does not move.
    assert formatting.pair_ratios([100.0, 50.0, 90.0], [100.0, 50.0, 60.0]) == [1.0, 1.0, 1.5]
    with pytest.raises(ValueError):
        formatting.pair_ratios([1.0, 2.0], [1.0])
    row = {"train_runs": [100.0, 50.0, 90.0], "infer_runs": [10.0, 40.0, 10.0]}
    twin = {"train_runs": [100.0, 50.0, 60.0], "infer_runs": [20.0, 10.0, 10.0]}
    formatting.add_ratios(row, twin)
    assert row["train_ratios"] == [1.0, 1.0, 1.5] and row["train_ratio"] == 1.0
    assert (row["train_ratio_min"], row["train_ratio_max"]) == (1.0, 1.5)
    assert row["infer_ratios"] == [0.5, 4.0, 1.0] and row["infer_ratio"] == 1.0
    assert (row["infer_ratio_min"], row["infer_ratio_max"]) == (0.5, 4.0)


def test_table_and_progress_show_the_median_ratio_and_its_spread():
    def row(framework, backend, device, **extra):
        return {
            "framework": framework,
            "backend": backend,
            "device": device,
            "model": "seed",
            "train_images_per_second": 500.0,
            "infer_images_per_second": 20000.0,
            "peak_rss_mib": 1.0,
            **extra,
        }

    ratios = {"train_ratio": 0.5, "train_ratio_min": 0.25, "train_ratio_max": 0.75}
    ratios |= {"infer_ratio": 2.0, "infer_ratio_min": 1.5, "infer_ratio_max": 2.5}
    results = [
        row("xpcnn", "jax", "cuda:0", compiled=True, **ratios),
        row("torch", "cuda", "cuda", compiled=False, paired_with="xpcnn:jax:seed"),
        {"framework": "xpcnn", "backend": "cupy", "model": "seed", "error": "out of memory"},
    ]
    lines = formatting.format_table(results).splitlines()
    assert lines[0].split()[4] == "compiled"
    assert lines[2].split()[:8] == ["seed", "xpcnn", "jax", "cuda:0", "yes", "500", "0.50", "(0.25-0.75)"]
    assert lines[2].split()[9:11] == ["2.00", "(1.50-2.50)"]
    assert lines[3].split()[:7] == ["seed", "torch", "cuda", "cuda", "no", "500", "20,000"]
    assert lines[4].endswith("failed: out of memory")
    assert formatting.format_progress(results[0]).endswith("vs torch: train 0.50 (0.25-0.75), infer 2.00 (1.50-2.50)")
    assert formatting.format_progress(results[1]).startswith("torch:cuda:seed (beside xpcnn:jax:seed) on cuda:")
    assert formatting.format_progress(results[2]) == "xpcnn:cupy:seed: failed: out of memory"
    long = formatting.format_table([{**results[0], "model": "resnet-small"}, results[1]]).splitlines()
    assert len({line.index(" xpcnn " if " xpcnn " in line else " torch ") for line in long[2:]}) == 1  # columns kept
    assert long[0].index("framework") == long[2].index("xpcnn")


def test_why_a_case_ended_reads_as_a_users_line():
    """A failed case showed xpcnn's exception class path, a failed full run "Error" twice, a killed case
    "no output"."""
    from xpcnn.apps.bench.sessions import _last_words

    assert _last_words(["...", "xpcnn.backends.backend.BackendError: cannot use cuda:0"], 1) == "cannot use cuda:0"
    assert _last_words(["Error: mnist not found"], 1) == "mnist not found"
    assert _last_words(["ZeroDivisionError: division by zero"], 1) == "ZeroDivisionError: division by zero"  # a bug
    assert _last_words([], -9) == "killed by signal 9" and _last_words([], 3) == "exit status 3, no output"


def test_a_case_named_twice_runs_once():
    args = ["bench", "--backend", "numpy", "--backend", "numpy", "--model", "seed", "--model", "seed", "--steps", "1"]
    args += ["--repeats", "1", "--threads", "1", "--train-batch", "8", "--infer-batch", "16", "--no-torch", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output[result.output.index("{") :])["results"]) == 1


@pytest.mark.parametrize(
    ("name", "eager"),
    [
        ("torch", False),
        pytest.param("jax", False, marks=pytest.mark.slow),
        pytest.param("jax", True, marks=pytest.mark.slow),
    ],
)
def test_a_case_serves_timed_runs_on_torch_and_jax(name, eager, restore_tf32):
    """On JAX the steps are the compiled ones unless eager, and the first reply says which."""
    pytest.importorskip(name)
    settings = cases.Settings(train_batch=8, infer_batch=16, steps=1, repeats=2, warmup=1, tf32=True, eager=eager)
    replies = []
    cases.serve(
        cases.Case("xpcnn", name, "seed"), settings, ["train\n", "train\n", "infer\n", "finish\n"], replies.append
    )
    assert backend._tf32  # the math mode is set for every case, xpcnn's and torch's
    assert replies[0]["device"] in ("cpu", "cuda:0")
    assert replies[0]["compiled"] == (name == "jax" and not eager)
    assert all(reply["rate"] > 0 for reply in replies[1:4])
    # Compiled, each timed training run is followed by one of the epoch program; inference has none.
    assert [("epoch_rate" in reply) for reply in replies[1:4]] == [replies[0]["compiled"]] * 2 + [False]
    assert all(reply["epoch_rate"] > 0 for reply in replies[1:3] if "epoch_rate" in reply)
    assert replies[4]["peak_rss_mib"] > 0 and len(replies) == 5


def test_a_compiled_row_gets_its_epoch_programs_ratio_to_the_step_programs_per_pair():
    row = {"framework": "xpcnn", "backend": "jax", "model": "seed", "device": "cpu"}
    row |= {"train_images_per_second": 100.0, "infer_images_per_second": 50.0}
    row |= {"train_runs": [100.0, 50.0, 80.0], "train_epoch_runs": [110.0, 60.0, 120.0]}
    formatting.add_epoch_ratios(row)
    assert row["train_epoch_images_per_second"] == 110.0
    assert row["epoch_vs_step_ratios"] == [1.1, 1.2, 1.5] and row["epoch_vs_step"] == 1.2
    assert (row["epoch_vs_step_min"], row["epoch_vs_step_max"]) == (1.1, 1.5)
    assert formatting.format_progress(row).endswith(
        "epoch program: train 110 img/s, vs the step programs 1.20 (1.10-1.50)"
    )


@pytest.mark.slow
def test_bench_pairs_numpy_with_torch_end_to_end(tmp_path):
    pytest.importorskip("torch")
    args = ["bench", "--backend", "numpy", "--model", "seed", "--steps", "1", "--repeats", "2", "--threads", "1"]
    args += ["--train-batch", "8", "--infer-batch", "16", "--output", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "torch:cpu:seed (beside xpcnn:numpy:seed) on cpu" in result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["ratio_spread"] == formatting.RATIO_SPREAD and report["settings"]["repeats"] == 2
    mine, twin = report["results"]
    assert (twin["framework"], twin["backend"], twin["paired_with"]) == ("torch", "cpu", "xpcnn:numpy:seed")
    for row in (mine, twin):
        assert row["device"] == "cpu" and len(row["train_runs"]) == len(row["infer_runs"]) == 2
        assert row["compiled"] is False
        assert row["peak_rss_mib"] > 0 and row["train_images_per_second"] > 0
    assert len(mine["train_ratios"]) == len(mine["infer_ratios"]) == 2
    assert mine["train_ratio_min"] <= mine["train_ratio"] <= mine["train_ratio_max"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a device that is always full")
def test_the_output_file_is_written_before_stdout_can_fail(tmp_path):
    """bench --output FILE > /dev/full: the figures measured are kept in FILE, then the failure is one line."""
    args = ["bench", "--backend", "numpy", "--model", "seed", "--steps", "1", "--repeats", "1", "--threads", "1"]
    args += ["--train-batch", "8", "--infer-batch", "16", "--no-torch", "--output", str(tmp_path / "bench.json")]
    result = run_onto_a_full_disk(args, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "Error: cannot write the output: No space left on device"
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["model"] == "seed"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a device that is always full")
def test_progress_onto_a_full_disk_is_lost_not_the_figures(tmp_path):
    """bench 2>/dev/full: its first progress line ended the run, with no figures and no --output."""
    args = ["bench", "--backend", "numpy", "--model", "seed", "--steps", "1", "--repeats", "1", "--threads", "1"]
    args += ["--train-batch", "8", "--infer-batch", "16", "--no-torch", "--output", str(tmp_path / "bench.json")]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "xpcnn", *args], stdout=subprocess.PIPE, stderr=full, timeout=300
        )
    assert result.returncode == 0 and b"seed" in result.stdout
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["model"] == "seed"


def test_a_failing_case_is_one_line_and_runs_no_twin():
    settings = cases.Settings(train_batch=8, infer_batch=16, steps=1, repeats=1, warmup=1, threads=1)
    (row,) = sessions.run_pair(cases.Case("xpcnn", "numpy", "no-such-model"), settings, with_torch=True)
    assert "unknown model" in row["error"] and "\n" not in row["error"]


@pytest.mark.slow
def test_full_run_reports_its_own_peak_memory_not_its_parents_or_an_earlier_childs(synthetic_dir):

    big = 800  # MiB: RUSAGE_CHILDREN would report an earlier child this big for every later child
    touch_pages = f"b = bytearray({big} * 2**20); b[::4096] = b'x' * len(b[::4096])"
    subprocess.run([sys.executable, "-c", touch_pages], check=True)
    # ... and ru_maxrss counts the parent's memory at spawn time: make this (the parent) big too.
    ballast = bytearray(big * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    run = sessions.full_run(str(synthetic_dir), "seed", "cpu", threads=1)
    assert "error" not in run, run
    assert 0 < run["peak_rss_mib"] < big, run
    assert run["epoch"] == 1 and 0 <= run["test_accuracy"] <= 1 and run["wall_seconds"] > 0


def test_full_run_failure_is_one_line(tmp_path):
    run = sessions.full_run(str(tmp_path), "seed", "cpu", threads=1)
    assert "error" in run and "\n" not in run["error"]


def test_the_command_exits_1_when_a_case_failed_and_keeps_the_others(monkeypatch, tmp_path):
    from xpcnn.apps.cli import main

    def run_pair(case, settings, with_torch):
        if case.model == "seed":
            return [{"framework": "xpcnn", "backend": case.backend, "model": case.model, "error": "out of memory"}]
        return [
            {
                "framework": "xpcnn",
                "backend": case.backend,
                "model": case.model,
                "device": "cpu",
                "train_images_per_second": 1.0,
                "infer_images_per_second": 2.0,
                "peak_rss_mib": 3.0,
            }
        ]

    monkeypatch.setattr(sessions, "run_pair", run_pair)
    args = ["bench", "--backend", "numpy", "--model", "seed", "--model", "lenet", "--no-torch"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "bench.json")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [("error" in row) for row in rows] == [True, False]


def test_json_flag_prints_the_report_alone_on_stdout(monkeypatch, tmp_path):
    from xpcnn.apps.cli import main

    row = {"framework": "xpcnn", "backend": "numpy", "model": "seed", "device": "cpu"}
    row |= {"train_images_per_second": 1.0, "infer_images_per_second": 2.0, "peak_rss_mib": 3.0}
    monkeypatch.setattr(sessions, "run_pair", lambda case, settings, with_torch: [row])
    args = ["bench", "--backend", "numpy", "--model", "seed", "--no-torch", "--json"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tmp_path / "bench.json").read_text())
    assert json.loads(result.stdout)["results"] == [row]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_a_case_keeps_to_its_thread_count_of_cpus(tmp_path):
    """XLA ignores OMP_NUM_THREADS: a JAX case at --threads 1 used both cores while its torch twin had one."""
    code = "import os; from xpcnn.apps.bench.cases import use_cpus; use_cpus(1); print(len(os.sched_getaffinity(0)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "1"


def test_a_case_stopped_while_it_starts_leaves_no_process(monkeypatch):
    """A signal while a case process was warming up left it running, orphaned, until its warm-up ended."""
    started = []
    popen = subprocess.Popen

    def remember(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(sessions.subprocess, "Popen", remember)
    monkeypatch.setattr(sessions.Worker, "_answer", interrupted)
    settings = cases.Settings(8, 8, 1, 1, 1, 1, False, False)
    with pytest.raises(KeyboardInterrupt):
        sessions.Worker(cases.Case("xpcnn", "numpy", "seed"), settings)
    assert started and started[0].poll() is not None


def test_output_never_replaces_a_file_of_a_run(monkeypatch, tmp_path):
    """As export's --output: a run's checkpoint overwritten by figures was a run lost."""
    from xpcnn.apps.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.npz").write_bytes(b"the run's weights")
    monkeypatch.setattr(sessions, "run_pair", lambda case, settings, with_torch: pytest.fail("benchmarked"))
    for name in ("checkpoint.npz", "history.json"):
        args = ["bench", "--backend", "numpy", "--model", "seed", "--no-torch", "--output", str(run / name)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and f"{run / name} is a file of the run in {run}" in result.output
    assert (run / "checkpoint.npz").read_bytes() == b"the run's weights" and not (run / "history.json").exists()
