"""Hostile input, by class: files that are not regular files, checkpoints that lie, bad settings, shared run folders.

Every command that reads a file is run as a real process with a hard timeout: a FIFO must be refused at
once, never waited on.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import xpcnn
from xpcnn.apps.cli import main
from xpcnn.apps.serve import DigitReader
from xpcnn.backends.backend import get_backend
from xpcnn.base import files
from xpcnn.base.errors import ConfigError, NonFiniteOutputs, XpcnnError
from xpcnn.data.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xpcnn.data.device_data import Normalization
from xpcnn.data.idx import DataError, read_idx
from xpcnn.data.images import ImageError, load_image
from xpcnn.training import display, runs
from xpcnn.training.config import TrainConfig

REPOSITORY = Path(__file__).resolve().parents[1]
needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def xpcnn_process(*args, cwd=None, timeout=60):
    """``python -m xpcnn ARGS`` in a fresh process that must end within ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "XPCNN_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "xpcnn", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def assert_one_line_error(result, *expected):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """A seed model trained for one quick epoch on the synthetic digits."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    args = ["train", "--model", "seed", "--epochs", "1", "--batch-size", "100", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(synthetic_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- files that are not regular files


@needs_fifos
@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{run}", "{fifo}.png"],
        ["predict", "{run}", "{fifo}.npy"],
        ["evaluate", "{fifo}.npz"],
        ["export", "{fifo}.npz", "--format", "safetensors", "--output", "{tmp}/out.safetensors"],
        ["serve", "{fifo}.npz", "--port", "0"],
        ["evaluate", "{run}", "--data-dir", "{data}"],
    ],
    ids=["predict-picture", "predict-npy", "evaluate", "export", "serve", "evaluate-idx"],
)
def test_a_fifo_is_refused_at_once_by_every_command(command, run, synthetic_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for source in synthetic_dir.iterdir():
        (data / source.name).symlink_to(source)
    (data / "t10k-images-idx3-ubyte.gz").unlink()
    os.mkfifo(data / "t10k-images-idx3-ubyte.gz")
    for suffix in (".png", ".npy", ".npz"):
        os.mkfifo(tmp_path / f"pipe{suffix}")
    args = [a.format(run=run, fifo=tmp_path / "pipe", tmp=tmp_path, data=data) for a in command]
    result = xpcnn_process(*args)
    assert_one_line_error(result, "FIFO", "not a regular file")


@needs_fifos
def test_a_fifo_in_a_run_directory_is_refused(run, tmp_path):
    fake = tmp_path / "run"
    fake.mkdir()
    os.mkfifo(fake / "checkpoint.npz")
    assert_one_line_error(xpcnn_process("evaluate", fake), "FIFO")
    (fake / "checkpoint.npz").unlink()
    (fake / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes())
    os.mkfifo(fake / "config.json")  # read on resume for the data directory: must not hang either
    result = xpcnn_process("train", "--resume", fake, "--epochs", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr


def test_sockets_and_devices_are_refused_by_the_one_opener(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        for read in (load_checkpoint, load_image, read_idx):
            with pytest.raises(XpcnnError, match="not a regular file"):
                read(path)
    for read in (load_checkpoint, load_image, read_idx):
        with pytest.raises(XpcnnError, match="character device, not a regular file"):
            read("/dev/zero")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(DataError, match="directory"):
        read_idx(tmp_path)


# ---------------------------------------------------------------- checkpoints that lie


def rewrite(run: Path, target: Path, change) -> Path:
    """Copy ``run``'s checkpoint to ``target`` with ``change(meta, model_state, optim_state)`` applied."""
    checkpoint = load_checkpoint(run)
    meta = json.loads(json.dumps(checkpoint.meta))
    meta.pop("optimizer_state", None)
    model_state = dict(checkpoint.model_state)
    optimizer_state = json.loads(json.dumps({k: v for k, v in checkpoint.optimizer_state.items() if k != "state"}))
    optimizer_state["state"] = {name: dict(slots) for name, slots in checkpoint.optimizer_state["state"].items()}
    change(meta, model_state, optimizer_state)
    save_checkpoint(target, meta, model_state, optimizer_state)
    return target


def _first(state):
    return next(iter(state))


CHECKPOINT_LIES = {
    "another-model": (lambda m, s, o: m["config"].update(model="lenet"), "does not fit model 'lenet'"),
    "missing-weight": (lambda m, s, o: s.pop(_first(s)), "missing"),
    "misshapen-weight": (lambda m, s, o: s.update({_first(s): np.zeros((2, 2), np.float32)}), "has shape"),
    "foreign-slot": (
        lambda m, s, o: o["state"][_first(o["state"])].update(alien=np.zeros(3, np.float32)),
        "unexpected slots ['alien']",
    ),
    "step-past-epoch": (lambda m, s, o: m["state"].update(step=10**6), "step 1000000 is past the end"),
    "history-not-records": (lambda m, s, o: m["state"].update(history=[1]), "'state.history'"),
    "history-missing-keys": (lambda m, s, o: m["state"]["history"][0].pop("seconds"), "'state.history' record 1"),
    "class-name-on-two-lines": (lambda m, s, o: m["classes"].__setitem__(0, "zero\nError: fake"), "'classes'"),
    "a-class-name-twice": (lambda m, s, o: m["classes"].__setitem__(1, m["classes"][0]), "'classes'"),
    "history-flag-for-number": (
        lambda m, s, o: m["state"]["history"][0].update(train_accuracy=True),
        "'state.history' record 1",
    ),
    "nan-weight": (lambda m, s, o: s[_first(s)].__setitem__((0,) * s[_first(s)].ndim, np.nan), "non-finite"),
    "inf-slot": (lambda m, s, o: next(iter(next(iter(o["state"].values())).values())).fill(np.inf), "non-finite"),
    "zero-std": (lambda m, s, o: m["normalization"].update(std=0.0), "std"),
    "tiny-std": (lambda m, s, o: m["normalization"].update(std=1e-300), "std"),
    "string-epochs": (lambda m, s, o: m["config"].update(epochs="2"), "epochs must be an integer"),
    "content-digests-not-a-map": (lambda m, s, o: m["data"].update(content_sha256=[1]), "'data' must name"),
    "file-digest-not-text": (lambda m, s, o: m["data"]["sha256"].update(x=1), "'data' must name"),
    # Integers beyond a float's range overflow the checks that read them as numbers.
    "huge-integer-count": (lambda m, s, o: m["state"]["partial"].update(loss_sum=10**400), "integer of 401 digits"),
    "huge-integer-setting": (lambda m, s, o: m["config"].update(lr=-(10**400)), "integer of 401 digits"),
    # Finite in float64, infinite once cast to the model's float32.
    "weight-beyond-float32": (
        lambda m, s, o: s.update({_first(s): np.full(s[_first(s)].shape, 1e300)}),
        "too large for float32",
    ),
    "slot-beyond-float32": (
        lambda m, s, o: o["state"][_first(o["state"])].update(
            {slot: np.full(v.shape, -1e300) for slot, v in o["state"][_first(o["state"])].items()}
        ),
        "too large for its dtype",
    ),
}


@pytest.mark.parametrize("lie", list(CHECKPOINT_LIES))
def test_every_reader_of_a_checkpoint_refuses_one_that_lies_in_one_line(lie, run, synthetic_dir, tmp_path):
    change, message = CHECKPOINT_LIES[lie]
    target = tmp_path / "bad"
    target.mkdir()

    def apply(meta, model_state, optimizer_state):
        for key in model_state:
            model_state[key] = model_state[key].copy()
        for slots in optimizer_state["state"].values():
            for slot in slots:
                slots[slot] = slots[slot].copy()
        change(meta, model_state, optimizer_state)

    rewrite(run, target / "checkpoint.npz", apply)
    runner = CliRunner()
    readers = [
        ["train", "--resume", str(target), "--epochs", "3", "--quiet", "--data-dir", str(synthetic_dir)],
        ["evaluate", str(target), "--data-dir", str(synthetic_dir)],
        ["export", str(target), "--format", "safetensors", "--output", str(tmp_path / "out.safetensors")],
    ]
    resume_only = lie in ("foreign-slot", "step-past-epoch", "inf-slot", "slot-beyond-float32")
    for args in readers[:1] if resume_only else readers:
        result = runner.invoke(main, args)
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_library_refuses_non_finite_checkpoints_too(run, tmp_path):
    def poison(meta, model_state, optimizer_state):
        key = _first(model_state)
        model_state[key] = np.full_like(model_state[key], np.inf)

    with pytest.raises(CheckpointError, match="non-finite values"):
        load_checkpoint(rewrite(run, tmp_path / "inf.npz", poison))
    with pytest.raises(XpcnnError, match="std"):
        Normalization(0.1, 0.0)
    with pytest.raises(XpcnnError, match="std"):
        Normalization(0.1, float("nan"))


def test_a_checkpoint_holding_an_array_twice_is_refused(run, tmp_path):
    """Which copy a zip reader takes is its choice (numpy's, the last): a checkpoint is never read by a guess."""
    twice = tmp_path / "twice.npz"
    shutil.copyfile(run / "checkpoint.npz", twice)
    name = next(name for name in zipfile.ZipFile(twice).namelist() if name.startswith("model/"))
    with warnings.catch_warnings(), zipfile.ZipFile(twice, "a") as archive:
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        with archive.open(name, "w") as member:
            np.lib.format.write_array(member, np.zeros(load_checkpoint(run).model_state[name[6:-4]].shape, np.float32))
    with pytest.raises(CheckpointError, match=f"holds {name} more than once"):
        load_checkpoint(twice)


def fake_npy_member(shape_text: str) -> bytes:
    """The header of an .npy array declaring ``shape_text``, followed by 16 bytes."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(16)


def test_a_checkpoint_is_checked_before_it_is_inflated(run, tmp_path):
    meta = np.load(run / "checkpoint.npz")["meta.json"]
    declares = tmp_path / "declares.npz"
    with zipfile.ZipFile(declares, "w") as archive:
        with archive.open("meta.json.npy", "w") as member:
            np.lib.format.write_array(member, meta)
        archive.writestr("model/0.weight.npy", fake_npy_member("(1000000000000,)"))
    with pytest.raises(CheckpointError, match="declares"):
        load_checkpoint(declares)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("meta.json.npy", (run / "checkpoint.npz").read_bytes()[:0] + bytes(300 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(CheckpointError, match="over the limit"):
        load_checkpoint(bomb)


def test_a_checkpoint_whose_outputs_overflow_is_refused_by_every_reader(run, synthetic_dir, tmp_path):
    """Finite weights (each under float32's largest) whose products are not: NaN outputs, refused in one line
    rather than predicted at "nan%", served as invalid JSON, evaluated at chance or exported."""

    def overflowing(meta, model_state, optimizer_state):
        for key in model_state:
            model_state[key] = np.full_like(model_state[key], 3e38)

    target = tmp_path / "overflows"
    target.mkdir()
    rewrite(run, target / "checkpoint.npz", overflowing)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    np.save(tmp_path / "one.npy", digit)
    readers = [
        ["evaluate", str(target), "--data-dir", str(synthetic_dir)],
        ["evaluate", str(target), "--json", "--data-dir", str(synthetic_dir)],
        ["predict", str(target), str(tmp_path / "one.npy")],
        ["predict", str(target), str(tmp_path / "one.npy"), "--json"],
        ["export", str(target), "--format", "safetensors", "--output", str(tmp_path / "out.safetensors")],
        ["evaluate", str(run), "--ensemble", str(target), "--data-dir", str(synthetic_dir)],  # which member
    ]
    for args in readers:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        named = f"{target / 'checkpoint.npz'}: the model's outputs are NaN or infinite"
        assert named in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Warning" not in result.output, (args, result.output)
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(NonFiniteOutputs, match="overflows"):
        DigitReader(load_checkpoint(target), get_backend("numpy", "cpu"))


# ---------------------------------------------------------------- outputs and their names


def test_export_refuses_to_replace_its_own_input(run):
    before = (run / "checkpoint.npz").read_bytes()
    args = ["export", str(run), "--format", "safetensors", "--output", str(run / "checkpoint.npz"), "--force"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is the checkpoint being exported" in result.output
    assert (run / "checkpoint.npz").read_bytes() == before
    for name in ("config.json", "history.json"):  # the run's other files, even with --force
        kept = (run / name).read_bytes()
        args = ["export", str(run), "--format", "safetensors", "--output", str(run / name), "--force"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "is a file of the run in" in result.output, result.output
        assert (run / name).read_bytes() == kept


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_is_named_as_given(tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    with pytest.raises(PermissionError) as error:
        files.write_json(readonly / "config.json", {})
    assert error.value.filename == str(readonly / "config.json")


def test_write_errors_name_the_file_not_its_temporary(tmp_path, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.EROFS, "Read-only file system", args[0])

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError, match="Read-only") as error:
        files.write_json(tmp_path / "config.json", {})
    assert error.value.filename == str(tmp_path / "config.json") and ".part" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_outputs_are_checked_before_the_work(run, tmp_path):
    missing = tmp_path / "missing" / "out.json"
    result = CliRunner().invoke(main, ["bench", "--model", "seed", "--no-torch", "--output", str(missing)])
    assert result.exit_code == 1 and f"{missing}: cannot write it" in result.output
    assert "img/s" not in result.output  # refused before any case ran
    with pytest.raises(XpcnnError, match="is not a directory"):
        files.check_writable(missing)


# ---------------------------------------------------------------- pictures


def test_predict_refuses_a_huge_picture_from_its_header(run, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (12_000, 12_000)).save(path, optimize=False)  # 144 megapixels, a small file
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)
    result = CliRunner().invoke(main, ["predict", str(run), str(path)])
    assert result.exit_code == 1 and "over the limit" in result.output


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_predict_refuses_a_huge_array_from_its_header(tmp_path, version):
    import io

    header = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(header, {"descr": "<f8", "fortran_order": False, "shape": (4096, 4096, 3)})
    path = tmp_path / "huge.npy"
    path.write_bytes(header.getvalue() + bytes(1024))  # 400 MB declared, a small file
    with pytest.raises(ImageError, match="an array of 50,331,648 values is over the limit"):
        load_image(path)
    small = tmp_path / "small.npy"
    digit = np.zeros((28, 28), np.float32)
    digit[6:22, 12:16] = 1.0
    np.save(small, digit)
    assert load_image(small).shape == (28, 28)  # the header was read and the file rewound


def test_a_closed_output_pipe_ends_the_command_quietly_with_141(run, tmp_path):
    picture = tmp_path / "digit.png"
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a 1
    Image.fromarray(digit).save(picture)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    process = subprocess.Popen(
        [sys.executable, "-m", "xpcnn", "predict", str(run), str(picture), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # the reader went away, as `xpcnn predict ... | head -0` would
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 141 and stderr == b"", (process.returncode, stderr.decode())


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
def test_a_reader_gone_after_part_of_a_large_output_is_141_too(run, tmp_path, unbuffered):
    """With PYTHONUNBUFFERED the JSON of many pictures went out in one raw write, which the pipe cut short when its
    reader left: the rest was lost without an error, and predict exited 0."""
    digit = np.zeros((28, 28), np.float32)
    digit[6:22, 12:16] = 1.0
    np.save(tmp_path / "one.npy", digit)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "PYTHONUNBUFFERED": unbuffered}
    pictures = [str(tmp_path / "one.npy")] * 300
    command = [sys.executable, "-m", "xpcnn", "predict", str(run), *pictures, "--top-k", "10", "--json"]
    process = subprocess.Popen([*command, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout.read(10) == b"[\n  {\n    "  # 10 bytes of about 200 kB, as `| head -c 10` reads
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 141 and stderr == b"", (process.returncode, stderr.decode())


def test_output_the_terminal_cannot_encode_is_escaped_not_a_traceback(run, tmp_path):
    target = tmp_path / "surrogate"
    target.mkdir()
    rewrite(
        run,
        target / "checkpoint.npz",
        lambda m, s, o: m["classes"].__setitem__(slice(None), [f"\ud800{k}" for k in range(10)]),
    )
    picture = tmp_path / "digit.png"
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(picture)
    result = xpcnn_process("predict", target, picture, "--device", "cpu")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "\\ud800" in result.stdout, result.stdout


def test_out_of_memory_is_one_line_not_a_bug():
    import click

    from xpcnn.apps.exits import friendly_errors

    @click.command()
    @friendly_errors
    def allocate():
        raise MemoryError("Unable to allocate 2.00 GiB for an array with shape (2147483648,)")

    result = CliRunner().invoke(allocate)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: out of memory: Unable to allocate 2.00 GiB for an array with shape (2147483648,)"
    ]


def test_a_float_tiff_in_0_1_is_read_as_a_digit(tmp_path):
    digit = np.zeros((28, 28), np.float32)
    digit[6:22, 12:16] = 1.0  # a bright 1 on black, floats in [0, 1]
    Image.fromarray(digit, mode="F").save(tmp_path / "one.tif")
    Image.fromarray((digit * 255).astype(np.uint8)).save(tmp_path / "one.png")
    image = load_image(tmp_path / "one.tif")
    assert image.shape == (28, 28) and image.max() == 1.0
    np.testing.assert_allclose(image, load_image(tmp_path / "one.png"), atol=1e-6)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "setting, value",
    [
        ("epochs", "2"),
        ("epochs", 1.5),
        ("epochs", True),
        ("lr", "0.1"),
        ("batch_size", 1.5),
        ("seed", 0.5),
        ("momentum", None),
        ("augment", "yes"),
        ("elastic_sigma", 1e-300),
        ("elastic_sigma", 1e300),
        ("elastic", 1e300),
        ("validation", -0.5),
        ("lr", 10**400),  # beyond a float's range: float() of it overflows
        ("seed", 10**400),  # an integer setting too: its checkpoint could not be read back
        ("epochs", 10**400),
    ],
)
def test_settings_of_the_wrong_type_or_range_are_a_config_error_naming_them(setting, value):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{setting: value})
    assert error.value.setting == setting
    images = np.zeros((8, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    with pytest.raises(ConfigError) as error:
        xpcnn.fit("seed", (images, np.arange(8) % 2), backend="numpy", **{setting: value})
    assert error.value.setting == setting


def test_library_evaluate_checks_its_batch_size():
    images = np.zeros((4, 28, 28), np.uint8)
    model = xpcnn.models.build("seed")
    for bad in (0, 1.5, "10", True):
        with pytest.raises(ConfigError, match="batch"):
            xpcnn.evaluate(model, images, np.zeros(4, np.int64), normalization=Normalization(0.1, 0.3), batch_size=bad)


@pytest.mark.parametrize("sigma", ["1e-300", "1e300"])
def test_the_command_line_names_the_flag_of_a_bad_setting(sigma):
    result = CliRunner().invoke(main, ["train", "--elastic", "1", "--elastic-sigma", sigma, "--device", "cpu"])
    assert result.exit_code == 2, result.output  # outside the range --help shows
    assert result.output.strip().splitlines()[-1].startswith("Error: Invalid value for '--elastic-sigma'")


# ---------------------------------------------------------------- run directories


def quick_config():
    return TrainConfig(model="seed", epochs=1, batch_size=100, seed=1, log_every=1)


def test_a_directory_in_use_by_another_run_is_refused(synthetic, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with files.locked_directory(out):  # as another process training there holds it
        with pytest.raises(XpcnnError, match="in use by another xpcnn run"):
            runs.train_run(quick_config(), get_backend("numpy"), synthetic, out, progress=display.Progress(None))
    assert list(out.iterdir()) == []


def test_files_xpcnn_did_not_write_are_never_taken_over(synthetic, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text('{"their": "settings"}')
    (out / ".notes.part").write_text("mine")
    (out / ".config.json.abc.part").write_text("")  # a temporary of xpcnn's name is xpcnn's: removed when claimed
    with pytest.raises(XpcnnError, match="that xpcnn did not write"):
        runs.train_run(quick_config(), get_backend("numpy"), synthetic, out, progress=display.Progress(None))
    assert (out / "config.json").read_text() == '{"their": "settings"}' and (out / ".notes.part").exists()
    (out / "config.json").unlink()
    runs.train_run(quick_config(), get_backend("numpy"), synthetic, out, progress=display.Progress(None))
    assert (out / ".notes.part").read_text() == "mine" and not (out / ".config.json.abc.part").exists()


def test_two_runs_into_one_directory_one_wins_the_other_is_refused(synthetic, tmp_path):
    out = tmp_path / "run"
    results = []

    def train():
        try:
            runs.train_run(quick_config(), get_backend("numpy"), synthetic, out, progress=display.Progress(None))
            results.append("trained")
        except XpcnnError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=train) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results.count("trained") == 1, results
    assert any("in use by another xpcnn run" in r or "already holds a run" in r for r in results), results


def test_default_run_names_never_collide(tmp_path):
    names = {runs.default_run_dir(quick_config(), tmp_path / "runs") for _ in range(3)}
    assert len(names) == 3 and all(path.is_dir() for path in names)


@pytest.mark.parametrize("holder", ["a dangling link", "a file"])
def test_a_runs_folder_name_held_by_something_else_is_an_error_not_a_hang(tmp_path, holder):
    root = tmp_path / "runs"
    if holder == "a file":
        root.write_text("not a folder")
    else:
        root.symlink_to(tmp_path / "unmounted")
    with pytest.raises((XpcnnError, OSError), match="not a directory|Not a directory"):
        runs.default_run_dir(quick_config(), root)


def test_three_parallel_trains_without_out_each_get_a_directory(synthetic_dir, tmp_path):
    args = ["train", "--model", "seed", "--epochs", "1", "--batch-size", "200", "--device", "cpu", "--quiet"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "xpcnn", *args, "--data-dir", str(synthetic_dir)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for process in processes:
        process.communicate(timeout=180)
        assert process.returncode == 0
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 3 and all((path / "checkpoint.npz").exists() for path in made)


@pytest.mark.parametrize("runs_before", [False, True], ids=["without runs/", "with runs/"])
@pytest.mark.parametrize("problem", ["no data", "a damaged file"])
def test_a_run_that_fails_before_writing_leaves_no_default_directory(synthetic_dir, tmp_path, problem, runs_before):
    """The folder runs/<model>-<time> is made first (so parallel runs never share one); a run that stops
    before writing anything removes it again, and runs/ too if it made that, and the error is still one line
    with exit status 1."""
    data = tmp_path / "data"
    data.mkdir()
    if runs_before:
        (tmp_path / "runs").mkdir()
    if problem == "a damaged file":
        for source in Path(synthetic_dir).iterdir():
            (data / source.name).write_bytes(source.read_bytes()[:100])
    done = subprocess.run(
        [sys.executable, "-m", "xpcnn", "train", "--model", "seed", "--device", "cpu", "--data-dir", str(data)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("Error"), done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == (["data", "runs"] if runs_before else ["data"])
    assert not runs_before or list((tmp_path / "runs").iterdir()) == []
