"""scripts/gpu_check.sh --quick, its flow run on the CPU (--dry-run-cpu) with tiny settings."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_quick_gpu_check_runs_every_step_in_order_on_the_cpu(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_BENCH_MODELS="--model seed",
        GPU_CHECK_BATCHES="16",
        GPU_CHECK_LATER_RUNS="reference",
        GPU_CHECK_DEFAULT_EPOCHS="1",
        GPU_CHECK_SEARCH="1",
        GPU_RECIPES_CANDIDATES="widenet-30-epochs resnet",
        GPU_RECIPES_SEEDS="0",
        GPU_RECIPES_OPTIONS="--validation 100 --epochs-cap 1",
    )
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run-cpu", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    steps = (out / "steps.txt").read_text()
    names = re.findall(r"^# \S+ (\S+): exit (\d+)", steps, flags=re.MULTILINE)
    expected = [
        "info", "bench-b16", "train-default-jax", "train-fast-jax", "train-default-numpy", "train-fast-numpy",
        "train-quick-jax", "epoch-warm", "tests", "search", "bench-b16-reference",
    ]  # fmt: skip
    assert [name for name, _ in names] == expected, steps
    assert all(status == "0" for _, status in names), steps
    # The jax row has the step programs, the epoch program and torch; every run says its accuracy.
    assert re.search(r"seed on jax \(cpu\): train .* epoch program: train .* x the step programs \d", steps), steps
    assert len(re.findall(r"\d+ epoch\(s\): .* test accuracy", steps)) == 2 * 2 + 1, steps
    # Warm epochs of both programs; a candidate chosen on validation, then its three seeds on the test set.
    assert re.search(r"epoch program / step programs: [\d.]+x", steps), steps
    assert re.search(r"chosen on validation: (widenet-30-epochs|resnet)\n", steps), steps
    assert re.search(r"mean test accuracy [\d.]+% over 3 finished seed\(s\)", steps), steps
    assert "done" in steps.splitlines()[-1]


def test_the_quick_gpu_check_fails_when_a_step_fails_and_writes_where_it_is_called(tmp_path):
    """It exited 0 whatever its steps did, and a relative OUT_DIR landed in the checkout."""
    env = dict(os.environ, PYTHON="false", GPU_CHECK_BENCH_MODELS="--model seed", GPU_CHECK_BATCHES="16")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run-cpu", "relative"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:]
    steps = (tmp_path / "relative" / "steps.txt").read_text()
    assert "a step failed" in steps and not (ROOT / "relative").exists()
