"""Run directories survive a failed write at any point: a crash or a full disk leaves a run to resume or restart."""

import errno
import gzip
import json
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_synthetic_mnist

from xpcnn.apps.cli import main
from xpcnn.backends.backend import get_backend
from xpcnn.base import files
from xpcnn.base.errors import XpcnnError
from xpcnn.data import device_data
from xpcnn.data.checkpoint import CheckpointError, load_checkpoint
from xpcnn.data.data import FILES, load_dataset, other_files
from xpcnn.training import display, runs
from xpcnn.training.config import TrainConfig


def config():
    return TrainConfig(model="seed", epochs=2, batch_size=100, optimizer="sgd", lr=0.05, seed=1, log_every=1)


def run(dataset, out, resume=None):
    return runs.train_run(config(), get_backend("numpy"), dataset, out, resume=resume, progress=display.Progress(None))


class DiskFull:
    """Make the ``count``-th commit (os.replace) of a file named ``name`` fail as a full disk would."""

    def __init__(self, monkeypatch, name, count):
        self.name, self.left = name, count
        monkeypatch.setattr(files.os, "replace", self.replace)

    def replace(self, source, target):
        if str(target).endswith(self.name):
            self.left -= 1
            if self.left == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
        return _replace(source, target)


_replace = files.os.replace


@pytest.mark.parametrize(
    "name, count",
    [
        ("config.json", 1),
        ("history.json", 1),  # before the first checkpoint
        ("checkpoint.npz", 1),  # the first epoch's commit point: as if killed between the two writes
        ("history.json", 2),
        ("checkpoint.npz", 2),
    ],
)
def test_a_failed_write_leaves_a_run_to_resume_or_restart(synthetic, tmp_path, monkeypatch, name, count):
    straight = tmp_path / "straight"
    run(synthetic, straight)
    out = tmp_path / "run"
    failure = DiskFull(monkeypatch, name, count)
    with pytest.raises(OSError, match="No space left"):
        run(synthetic, out)
    monkeypatch.setattr(files.os, "replace", _replace)
    assert failure.left == 0 and not list(out.glob(".*.part"))
    if runs.run_dir_has_run(out):  # history.json is never behind: a finished run's is not written again
        checkpointed = load_checkpoint(out).meta["state"]["history"]
        assert len(json.loads((out / "history.json").read_text())) >= len(checkpointed)
        state = run(synthetic, out, resume=load_checkpoint(out))
    else:
        state = run(synthetic, out)  # nothing to continue: trained afresh in the same directory
    assert state.epoch == 2
    history = json.loads((out / "history.json").read_text())
    assert [r["test_accuracy"] for r in history] == [
        r["test_accuracy"] for r in json.loads((straight / "history.json").read_text())
    ]
    a, b = load_checkpoint(out).model_state, load_checkpoint(straight).model_state
    assert all(np.array_equal(a[key], b[key]) for key in a)


def test_stale_temporary_files_are_removed(synthetic, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.npz.abc123.part").write_bytes(b"half a checkpoint")
    run(synthetic, out)
    assert not list(out.glob(".*.part"))


def test_a_failed_resume_leaves_config_json_as_it_was(synthetic, tmp_path, monkeypatch):
    out = tmp_path / "run"
    runs.train_run(
        TrainConfig(**{**config().to_dict(), "epochs": 1}),
        get_backend("numpy"),
        synthetic,
        out,
        progress=display.Progress(None),
    )
    before = (out / "config.json").read_bytes()

    def no_memory(*args, **kwargs):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(device_data.DeviceSplit, "from_host", no_memory)
    with pytest.raises(MemoryError):
        run(synthetic, out, resume=load_checkpoint(out))
    assert (out / "config.json").read_bytes() == before


def test_the_command_line_restarts_a_directory_without_a_checkpoint(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": "seed", "xpcnn_version": "0"}')  # a run killed before its checkpoint
    (out / "history.json").write_text("[]")
    runner = CliRunner()
    resumed = runner.invoke(main, ["train", "--resume", str(out), "--data-dir", str(synthetic_dir)])
    assert resumed.exit_code == 2 and resumed.exception is not None
    assert f"{out} holds no checkpoint.npz to continue (its run stopped before its first one)" in resumed.output
    assert resumed.output.rstrip().endswith("start it afresh with --out")
    started = runner.invoke(
        main,
        ["train", "--model", "seed", "--epochs", "1", "--device", "cpu", "--data-dir", str(synthetic_dir)]
        + ["--out", str(out)],
    )
    assert started.exit_code == 0, (started.output, started.exception)
    assert runs.run_dir_has_run(out)


@pytest.mark.parametrize("content", ["[1, 2]", '{"data_dir": 7}', "not json", '"text"'])
def test_a_damaged_config_json_only_loses_the_data_dir_hint(synthetic_dir, tmp_path, content):
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["train", "--model", "seed", "--epochs", "1", "--device", "cpu", "--data-dir", str(synthetic_dir)]
    assert runner.invoke(main, [*args, "--out", str(out)]).exit_code == 0
    (out / "config.json").write_text(content)
    # No --data-dir: the run's stored one is looked up, and the data found through $XPCNN_DATA_DIR.
    result = runner.invoke(main, ["evaluate", str(out), "--json"], env={"XPCNN_DATA_DIR": str(synthetic_dir)})
    assert result.exit_code == 0 and result.exception is None, result.output
    assert json.loads(result.stdout)["images"] == 200


def test_a_run_records_its_data_and_other_files_need_a_flag(synthetic_dir, tmp_path):
    other_dir = write_synthetic_mnist(tmp_path / "other", seed=5)
    out = tmp_path / "run"
    runner = CliRunner()
    common = ["--model", "seed", "--device", "cpu"]
    first = runner.invoke(
        main, ["train", *common, "--epochs", "1", "--data-dir", str(synthetic_dir), "--out", str(out)]
    )
    assert first.exit_code == 0, first.output
    record = load_checkpoint(out).meta["data"]
    assert record["dataset"] == "mnist" and record["directory"] == str(synthetic_dir.resolve())
    assert set(record["sha256"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"} | {
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    evaluated = runner.invoke(main, ["evaluate", str(out), "--data-dir", str(other_dir)])
    assert evaluated.exit_code == 1 and "differ from the test files the run recorded" in evaluated.output
    assert "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte differ" in evaluated.output
    assert "--allow-other-data" in evaluated.output
    allowed = runner.invoke(main, ["evaluate", str(out), "--data-dir", str(other_dir), "--allow-other-data"])
    assert allowed.exit_code == 0, allowed.output
    resumed = runner.invoke(main, ["train", "--resume", str(out), "--epochs", "2", "--data-dir", str(other_dir)])
    assert resumed.exit_code == 1 and "--allow-other-data:" in resumed.output
    assert resumed.exception is None or isinstance(resumed.exception, SystemExit)
    assert load_checkpoint(out).meta["state"]["epoch"] == 1


def test_the_same_data_unpacked_is_the_same_data_and_old_records_compare_files(synthetic_dir, tmp_path):
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    for path in synthetic_dir.glob("*.gz"):
        (unpacked / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["train", "--model", "seed", "--device", "cpu", "--epochs", "1", "--data-dir", str(synthetic_dir)]
    assert runner.invoke(main, [*args, "--out", str(out)]).exit_code == 0
    record = load_checkpoint(out).meta["data"]
    evaluated = runner.invoke(main, ["evaluate", str(out), "--data-dir", str(unpacked)])
    assert evaluated.exit_code == 0, evaluated.output
    resumed = runner.invoke(main, ["train", "--resume", str(out), "--epochs", "2", "--data-dir", str(unpacked)])
    assert resumed.exit_code == 0, resumed.output

    assert other_files(record, load_dataset("mnist", unpacked)) == []
    del record["content_sha256"]  # as runs recorded their data before content digests: the files' digests count
    assert other_files(record, load_dataset("mnist", synthetic_dir)) == []
    assert other_files(record, load_dataset("mnist", unpacked)) == list(FILES)


def test_a_run_found_through_xpcnn_data_dir_resumes_without_it(synthetic_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "mnist").symlink_to(synthetic_dir, target_is_directory=True)
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["train", "--model", "seed", "--device", "cpu", "--epochs", "1", "--out", str(out)]
    assert runner.invoke(main, args, env={"XPCNN_DATA_DIR": str(root)}).exit_code == 0
    resumed = runner.invoke(main, ["train", "--resume", str(out), "--epochs", "2"], env={"XPCNN_DATA_DIR": None})
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out).meta["state"]["epoch"] == 2


def test_a_damaged_checkpoint_says_how_to_start_afresh(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"PK\x03\x04 not really a zip")
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--data-dir", str(synthetic_dir)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"remove {out / 'checkpoint.npz'} to train afresh there" in result.output


def test_archives_and_arrays_that_are_not_ours_are_named_as_such(tmp_path):
    import zipfile

    from xpcnn.data.images import ImageError, load_image

    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError, match="without meta.json"):
        load_checkpoint(tmp_path / "other.npz")
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="holds pickled Python objects, not an array of numbers"):
        load_image(tmp_path / "objects.npy")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_output_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(XpcnnError, match="not a regular file"):
        files.write_json(fifo, {"a": 1})
    with pytest.raises(XpcnnError, match="not a regular file"):
        files.write_json(tmp_path, {"a": 1})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("links", [True, False])
def test_atomic_output_without_replacing_puts_a_file_only_where_none_is(tmp_path, monkeypatch, links):
    """replace=False: a hard link that fails where a file is; a file system without hard links gets a check."""
    from xpcnn.base import files

    if not links:

        def no_links(source, target):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(files.os, "link", no_links)
    target = tmp_path / "model.onnx"
    with files.atomic_output(target, replace=False) as out:
        out.write(b"first")
    with pytest.raises(FileExistsError) as error, files.atomic_output(target, replace=False) as out:
        out.write(b"second")
    assert error.value.filename == str(target)  # the user's file named, not the temporary one
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
