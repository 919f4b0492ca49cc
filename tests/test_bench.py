"""The benchmark's case list and ratios: xpcnn on each backend against torch eager on the same device."""

import pytest

from xpcnn import backend, bench


def test_each_xpcnn_case_gets_a_torch_twin_on_the_device_it_ran_on():
    assert [case.label for case in bench.xpcnn_cases(["numpy", "jax"], ["seed", "lenet"])] == [
        "xpcnn:numpy:seed",
        "xpcnn:jax:seed",
        "xpcnn:numpy:lenet",
        "xpcnn:jax:lenet",
    ]
    results = [
        {"framework": "xpcnn", "backend": "numpy", "model": "seed", "device": "cpu"},
        {"framework": "xpcnn", "backend": "torch", "model": "seed", "device": "cpu"},
        {"framework": "xpcnn", "backend": "jax", "model": "seed", "device": "cuda:0"},
        {"framework": "xpcnn", "backend": "cupy", "model": "lenet", "device": "cuda:1"},
        {"framework": "xpcnn", "backend": "cupy", "model": "convnet", "error": "out of memory"},
    ]
    assert [case.label for case in bench.twin_cases(results)] == [
        "torch:cpu:seed",
        "torch:cuda:seed",
        "torch:cuda:lenet",
    ]


def test_ratios_are_taken_against_torch_on_the_device_the_case_ran_on():
    def row(framework, backend, device, train, infer):
        return {
            "framework": framework,
            "backend": backend,
            "device": device,
            "model": "seed",
            "train_images_per_second": train,
            "infer_images_per_second": infer,
            "peak_rss_mib": 1.0,
        }

    results = [
        row("torch", "cpu", "cpu", 100.0, 1000.0),
        row("torch", "cuda", "cuda", 1000.0, 10000.0),
        row("xpcnn", "jax", "cuda:0", 500.0, 20000.0),
        row("xpcnn", "torch", "cpu", 50.0, 2000.0),
    ]
    bench.add_ratios(results)
    assert (results[2]["train_ratio"], results[2]["infer_ratio"]) == (0.5, 2.0)
    assert (results[3]["train_ratio"], results[3]["infer_ratio"]) == (0.5, 2.0)
    assert "train_ratio" not in results[0]
    lines = bench.format_table(results).splitlines()
    assert lines[4].split()[:4] == ["seed", "xpcnn", "jax", "cuda:0"]


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_a_case_runs_on_torch_and_jax(name, restore_tf32):
    pytest.importorskip(name)
    settings = bench.Settings(train_batch=8, infer_batch=16, steps=1, repeats=2, warmup=1, tf32=True)
    result = bench.run_case(bench.Case("xpcnn", name, "seed"), settings)
    assert backend.tf32_enabled()  # the math mode is set for every case, xpcnn's and torch's
    assert result["device"] in ("cpu", "cuda:0")
    assert len(result["train_runs"]) == 2 and result["train_images_per_second"] > 0
    assert result["infer_images_per_second"] > 0


def test_full_run_reports_its_own_peak_memory_not_its_parents_or_an_earlier_childs(synthetic_dir):
    import subprocess
    import sys

    big = 800  # MiB: RUSAGE_CHILDREN would report an earlier child this big for every later child
    touch_pages = f"b = bytearray({big} * 2**20); b[::4096] = b'x' * len(b[::4096])"
    subprocess.run([sys.executable, "-c", touch_pages], check=True)
    # ... and ru_maxrss counts the parent's memory at spawn time: make this (the parent) big too.
    ballast = bytearray(big * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    run = bench.full_run(str(synthetic_dir), "seed", "cpu", threads=1)
    assert "error" not in run, run
    assert 0 < run["peak_rss_mib"] < big, run
    assert run["epoch"] == 1 and 0 <= run["test_accuracy"] <= 1 and run["wall_seconds"] > 0


def test_full_run_failure_is_one_line(tmp_path):
    run = bench.full_run(str(tmp_path), "seed", "cpu", threads=1)
    assert "error" in run and "\n" not in run["error"]
