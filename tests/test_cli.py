"""The command line through click's test runner: happy paths and every user error as one line."""

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from xpcnn import __version__
from xpcnn.apps.cli import main
from xpcnn.data.data import BOTH_FORMS, TEST_FILES
from xpcnn.data.idx import read_idx

FAST = [
    "--model",
    "seed",
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--optimizer",
    "adam",
    "--lr",
    "0.005",
    "--device",
    "cpu",
]


def invoke(*args, expect=0, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    output = result.output
    assert result.exit_code == expect, output
    # click's runner turns an unexpected exception into exit status 1 with no traceback in the output:
    # only the exception it kept tells a handled exit from a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    return result


def assert_one_line_error(result, pattern):
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    assert re.search(pattern, error_lines[0]), error_lines[0]


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seed"
    invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", run)
    return run


def test_help_and_version():
    assert "train" in invoke("--help").output
    assert __version__ in invoke("--version").output
    for command in ("train", "evaluate", "predict", "info"):
        assert "Usage" in invoke(command, "--help").output


def test_train_writes_a_run_and_prints_a_summary(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    output = invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", run).output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.npz", "config.json", "history.json"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "seed" and config["backend"] == "numpy on cpu"
    (record,) = json.loads((run / "history.json").read_text())
    summary = output.strip().splitlines()[-1]
    expected = f"best test accuracy {100 * record['test_accuracy']:.2f}% (epoch 1)"
    assert summary.startswith(expected) and summary.endswith(f"run saved to {run}"), summary


def test_evaluate_agrees_with_history(trained_run, synthetic_dir):
    history = json.loads((trained_run / "history.json").read_text())
    report = json.loads(invoke("evaluate", trained_run, "--json").output)
    assert report["accuracy"] == history[-1]["test_accuracy"]
    assert report["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    confusion = np.array(report["confusion_matrix"])
    labels = read_idx(synthetic_dir / "t10k-labels-idx1-ubyte.gz")
    assert confusion.shape == (10, 10) and confusion.sum() == len(labels)
    assert np.array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=10))
    assert np.trace(confusion) / confusion.sum() == report["accuracy"]
    text = invoke("evaluate", trained_run).output
    assert f"accuracy {report['accuracy']:.2%}" in text and "confusion matrix" in text and "per-class" in text


def test_evaluate_needs_and_reads_only_the_test_files(trained_run, synthetic_dir, tmp_path):
    """As torchvision's train=False: a folder of the two t10k files is enough, and a damaged training file there
    is not read."""
    expected = json.loads(invoke("evaluate", trained_run, "--json").output)
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    for name in TEST_FILES:
        shutil.copy(synthetic_dir / name, test_only / name)
    assert json.loads(invoke("evaluate", trained_run, "--data-dir", test_only, "--json").output) == expected
    (test_only / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b damaged")
    assert json.loads(invoke("evaluate", trained_run, "--data-dir", test_only, "--json").output) == expected
    (test_only / TEST_FILES[1]).unlink()
    result = invoke("evaluate", trained_run, "--data-dir", test_only, expect=1)
    assert result.output == f"Error: {test_only}: missing mnist files: {TEST_FILES[1]} ({BOTH_FORMS})\n"


def test_evaluate_with_test_time_augmentation(trained_run):
    plain = json.loads(invoke("evaluate", trained_run, "--json").output)
    report = json.loads(invoke("evaluate", trained_run, "--tta", "--json").output)
    assert report["tta"]["views"] == 5 and 0 <= report["tta"]["accuracy"] <= 1 and report["tta"]["loss"] > 0
    assert {k: v for k, v in report.items() if k != "tta"} == plain  # the plain figures stay as they are
    text = invoke("evaluate", trained_run, "--tta").output
    assert f"with test-time augmentation (5 views): accuracy {report['tta']['accuracy']:.2%}" in text
    assert "test-time" not in invoke("evaluate", trained_run).output


@pytest.fixture(scope="module")
def second_run(synthetic_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seed-1"
    invoke("train", *FAST, "--seed", "1", "--model", "lenet-bn", "--data-dir", synthetic_dir, "--out", run)
    return run


def test_evaluate_an_ensemble(trained_run, second_run, synthetic_dir):
    plain = json.loads(invoke("evaluate", trained_run, "--json").output)
    report = json.loads(invoke("evaluate", trained_run, "--ensemble", second_run, "--json").output)
    assert {k: v for k, v in report.items() if k != "ensemble"} == plain  # the plain figures stay as they are
    assert report["ensemble"]["checkpoints"] == [
        str(trained_run / "checkpoint.npz"),
        str(second_run / "checkpoint.npz"),
    ]
    images = read_idx(synthetic_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(synthetic_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    mean = (library_probabilities(trained_run, images) + library_probabilities(second_run, images)) / 2
    expected_loss = np.mean(-np.log(mean[np.arange(len(labels)), labels]))
    assert report["ensemble"]["accuracy"] == pytest.approx(np.mean(mean.argmax(axis=1) == labels), abs=1e-3)
    assert report["ensemble"]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    text = invoke("evaluate", trained_run, "--ensemble", second_run).output
    assert f"ensemble of 2 models (softmax averaged): accuracy {report['ensemble']['accuracy']:.2%}" in text
    assert "ensemble" not in invoke("evaluate", trained_run).output


def test_an_ensemble_of_one_model_with_itself_is_that_model(trained_run):
    report = json.loads(invoke("evaluate", trained_run, "--ensemble", trained_run, "--json").output)
    assert report["ensemble"]["accuracy"] == report["accuracy"]
    assert report["ensemble"]["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_an_ensemble_needs_models_of_one_dataset(trained_run, synthetic_dir, tmp_path):
    other = tmp_path / "fashion"  # the same files under another dataset's name: other classes
    invoke("train", *FAST, "--dataset", "fashion-mnist", "--data-dir", synthetic_dir, "--out", other)
    result = invoke("evaluate", trained_run, "--ensemble", other, expect=1)
    assert_one_line_error(result, r"fashion.*checkpoint.npz: trained on fashion-mnist, not on mnist as .* was")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    result = invoke("evaluate", trained_run, "--ensemble", tmp_path / "junk.npz", expect=1)  # as for RUN itself
    assert_one_line_error(result, r"junk.npz: not an xpcnn checkpoint")
    invoke("evaluate", trained_run, "--ensemble", tmp_path / "missing", expect=2)


def test_evaluate_states_where_a_stopped_run_stands(trained_run, tmp_path):
    """A checkpoint that a stop (Ctrl-C, SIGTERM) wrote mid-epoch is not "epoch 0": its weights are 3 steps in."""
    from xpcnn.data.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(trained_run)
    meta = {**checkpoint.meta, "state": {**checkpoint.meta["state"], "epoch": 0, "step": 3, "history": []}}
    save_checkpoint(tmp_path / "checkpoint.npz", meta, checkpoint.model_state, checkpoint.optimizer_state)
    data_dir = ["--data-dir", checkpoint.meta["data"]["directory"]]
    assert "checkpoint.npz (at epoch 1, step 3) on the mnist test set" in invoke("evaluate", tmp_path, *data_dir).output
    report = json.loads(invoke("evaluate", tmp_path, *data_dir, "--json").output)
    assert (report["epoch"], report["step"]) == (0, 3)
    assert "checkpoint.npz (after epoch 1) on the mnist" in invoke("evaluate", trained_run).output


def test_predict_pictures_and_arrays(trained_run, synthetic_dir, tmp_path):
    images = read_idx(synthetic_dir / "t10k-images-idx3-ubyte.gz")
    np.save(tmp_path / "digit.npy", images[0])
    picture = Image.new("L", (120, 160), 255)  # a dark "1" on white paper, not 28x28
    ImageDraw.Draw(picture).line([(60, 20), (60, 140)], fill=0, width=14)
    picture.save(tmp_path / "digit.png")
    rows = json.loads(invoke("predict", trained_run, tmp_path / "digit.npy", tmp_path / "digit.png", "--json").output)
    assert [r["image"] for r in rows] == [str(tmp_path / "digit.npy"), str(tmp_path / "digit.png")]
    expected = library_probabilities(trained_run, images[:1])[0]
    assert rows[0]["class"] == int(np.argmax(expected)) and rows[0]["label"] == str(np.argmax(expected))
    assert rows[0]["probability"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert all(0 < r["probability"] <= 1 for r in rows)
    text = invoke("predict", trained_run, tmp_path / "digit.npy").output
    assert text.startswith(f"{tmp_path / 'digit.npy'}: {np.argmax(expected)} (")


def library_probabilities(run, images_uint8):
    """What the library computes for uint8 images (N, 28, 28) with the run's model."""
    from xpcnn.backends.backend import get_backend
    from xpcnn.data.checkpoint import load_checkpoint
    from xpcnn.data.device_data import normalize_images
    from xpcnn.training.runs import model_from_checkpoint
    from xpcnn.training.train import predict_probabilities

    numpy = get_backend("numpy")
    model, norm = model_from_checkpoint(load_checkpoint(run), numpy)
    return predict_probabilities(model, normalize_images(numpy, images_uint8[:, None] / 255.0, norm))


def test_a_checkpoint_fit_trained_on_arrays_predicts_but_is_not_evaluated_or_resumed(tmp_path):
    import xpcnn

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64)
    history = xpcnn.fit("seed", (images, labels), epochs=1, batch_size=32, backend="numpy")
    run = tmp_path / "run"
    run.mkdir()
    xpcnn.save(run / "checkpoint.npz", history.optimizer.model, history)
    stroke = np.zeros((28, 28), np.uint8)
    stroke[6:22, 12:16] = 255  # a 1
    np.save(tmp_path / "digit.npy", stroke)
    predicted = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "digit.npy")])
    assert predicted.exit_code == 0, predicted.output
    refusal = f"Error: {run} was trained by xpcnn.fit on arrays, not on a dataset's files: use it from Python"
    for command in (["evaluate", str(run)], ["train", "--resume", str(run), "--epochs", "2"]):
        result = CliRunner().invoke(main, command)
        assert (result.exit_code, result.output.strip().splitlines()[-1]) == (1, refusal), result.output


def test_info_lists_backends():
    output = invoke("info").output
    assert "numpy" in output and "array-api-strict" in output and "cupy" in output and "GPUs" in output


def test_info_says_where_data_is_and_why_it_could_not_be_downloaded(synthetic_dir, tmp_path):
    """Without a home folder info said MNIST would be downloaded on first use, which train then refused; a path
    with a newline split its line."""
    import shutil

    root = tmp_path / "data\nroot"
    shutil.copytree(synthetic_dir, root / "mnist")
    environment = {"HOME": "", "XDG_CACHE_HOME": "", "XPCNN_DATA_DIR": str(root)}
    lines = CliRunner().invoke(main, ["info"], env=environment).output.splitlines()
    assert any(line.split() == ["mnist", str(root / "mnist").replace("\n", "\\n")] for line in lines), lines
    environment["XPCNN_DATA_DIR"] = str(tmp_path / "nothing")
    lines = CliRunner().invoke(main, ["info"], env=environment).output.splitlines()
    assert "  mnist          not found locally (and no home folder to download into)" in lines, lines


def test_resume_continues_and_refuses_changes(trained_run, synthetic_dir, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    result = invoke("train", "--resume", run, "--epochs", "1", expect=2)
    message = f"^Error: {re.escape(str(run))} has already trained 1 epoch\\(s\\), --epochs 1 asks for no more: pass "
    assert_one_line_error(result, message)
    result = invoke("train", "--resume", run, "--epochs", "2", "--lr", "0.1", expect=2)
    message = f"^Error: --lr cannot change when resuming: {re.escape(str(run))} was trained with --lr 0.005 "
    assert_one_line_error(result, message)
    invoke("train", "--resume", run, "--epochs", "2", "--lr", "0.005", "--device", "cpu")  # its own value: no change
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1, 2]


def test_quiet_train_prints_only_the_final_summary(synthetic_dir, tmp_path):
    result = invoke(
        "train", *FAST, "--log-every", "1", "--quiet", "--data-dir", synthetic_dir, "--out", tmp_path / "run"
    )
    assert result.stderr == ""
    assert result.stdout.startswith("best test accuracy") and result.stdout.count("\n") == 1


def test_train_logs_plain_lines_when_not_a_terminal(synthetic_dir, tmp_path):
    result = invoke("train", *FAST, "--log-every", "1", "--data-dir", synthetic_dir, "--out", tmp_path / "run")
    assert "\r" not in result.stderr
    assert re.search(r"^epoch 1/1 step 1/\d+ loss [\d.]+ acc [\d.]+% [\d,]+ img/s elapsed ", result.stderr, re.M)
    assert re.search(r"^epoch 1/1  train loss [\d.]+ acc [\d.]+%  test loss ", result.stderr, re.M)


def test_refuses_to_overwrite_a_run_and_says_how_far_it_is(trained_run, synthetic_dir):
    result = invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", trained_run, expect=2)
    assert (
        f"{trained_run} already holds a run (1 of its 1 epoch(s) trained): continue it with "
        f"--resume {trained_run} --epochs 2, or pick another --out"
    ) in result.output


@pytest.mark.parametrize("started", [False, True])
def test_resuming_a_directory_without_a_checkpoint_says_why_only_when_it_knows(tmp_path, started):
    if started:
        (tmp_path / "config.json").write_text("{}")
    result = invoke("train", "--resume", tmp_path, expect=2)
    stopped = " (its run stopped before its first one)" if started else ""  # killed, diverged, a full disk
    assert_one_line_error(
        result, re.escape(f"{tmp_path} holds no checkpoint.npz to continue{stopped}: start it afresh with --out") + "$"
    )


def test_ctrl_c_writes_a_checkpoint_and_exits_130(synthetic_dir, tmp_path, monkeypatch):
    import os
    import signal

    from xpcnn.training import display

    real_update = display.Progress.update

    def update_then_ctrl_c(self, step, *args):
        real_update(self, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(display.Progress, "update", update_then_ctrl_c)
    run = tmp_path / "run"
    result = invoke("train", *FAST, "--log-every", "1", "--data-dir", synthetic_dir, "--out", run, expect=130)
    message = f"xpcnn: stopped by Ctrl-C at epoch 1, step 3; checkpoint written to {run}; continue with: xpcnn train"
    assert f"{message} --resume {run}" in result.output
    monkeypatch.undo()
    assert ", resuming at epoch 1, step 3" in invoke("train", "--resume", run).stderr
    assert len(json.loads((run / "history.json").read_text())) == 1


def test_nan_loss_exits_with_a_clear_message(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--optimizer", "sgd", "--momentum", "0", "--lr", "1e30", "--schedule", "constant"]
    result = invoke(
        "train", "--model", "seed", "--device", "cpu", *args, "--data-dir", synthetic_dir, "--out", run, expect=1
    )
    assert_one_line_error(
        result,
        r"loss became (nan|inf) at epoch 1, step \d+; no checkpoint was written; "
        r"start a new run with a --lr below 1e\+30$",
    )
    args = ["--weight-decay", "1e308", "--out", tmp_path / "decayed"]  # the decay alone blows the weights up
    result = invoke("train", "--model", "seed", "--device", "cpu", *args, "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"; start a new run with a --weight-decay below 20$")


@pytest.mark.parametrize(
    "breakage, pattern",
    [
        ("truncate", r"train-images-idx3-ubyte.gz: .*(truncated|corrupt|gzip)"),
        ("magic", r"train-labels-idx1-ubyte.gz: .*magic"),
        ("count", r"train-images-idx3-ubyte.gz has 600 images but .*train-labels-idx1-ubyte.gz has 599 labels"),
    ],
)
def test_bad_data_files_give_one_line_naming_the_file(synthetic_dir, tmp_path, breakage, pattern):
    import shutil

    from xpcnn.data.idx import write_idx

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    if breakage == "truncate":
        path = data / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:-100])
    elif breakage == "magic":
        path = data / "train-labels-idx1-ubyte.gz"
        raw = bytearray(read_idx(path).tobytes())
        import gzip

        path.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + len(raw).to_bytes(4, "big") + bytes(raw)))
    else:
        labels = read_idx(data / "train-labels-idx1-ubyte.gz")
        write_idx(data / "train-labels-idx1-ubyte.gz", labels[:-1])
    result = invoke("train", *FAST, "--data-dir", data, "--out", tmp_path / "run", expect=1)
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    "args, pattern, code",
    [
        (["train", "--data-dir", "{missing}", "--device", "cpu"], r"missing|not found|no such", 1),
        (["train", "--device", "tpu"], r"unknown device 'tpu'", 1),
        (["train", "--lr", "-1", "--device", "cpu"], r"learning rate must be a positive number", 1),
        (["train", "--model", "resnet"], r"Invalid value for '--model'", 2),
        (["train", "--elastic", "-1"], r"Invalid value for '--elastic'", 2),
        (["train", "--elastic", "nan", "--device", "cpu"], r"--elastic: elastic distortion scale must be in \[0, 1", 1),
        (["train", "--elastic-sigma", "0"], r"Invalid value for '--elastic-sigma'", 2),
        (["evaluate", "{tmp}/nothing.npz"], r"does not exist", 2),
        (["evaluate", "{corrupt}"], r"not an xpcnn checkpoint \(not an .npz archive\)", 1),
        (["predict", "{corrupt}", "x.png"], r"not an xpcnn checkpoint \(not an .npz archive\)", 1),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, pattern, code):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    names = {"missing": tmp_path / "missing", "tmp": tmp_path, "corrupt": corrupt}
    result = invoke(*[a.format(**names) for a in args], expect=code)
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and re.search(pattern, lines[0], flags=2), result.output


def test_cuda_without_cuda_is_one_line(synthetic_dir):
    from xpcnn.backends.backend import cuda_problem

    if cuda_problem() is None:
        pytest.skip("CUDA works here")
    result = invoke("train", "--device", "cuda", "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"cannot use cuda:0: ")


def test_predict_goes_on_past_unreadable_files_and_fails_at_the_end(trained_run, synthetic_dir, tmp_path):
    np.save(tmp_path / "digit.npy", read_idx(synthetic_dir / "t10k-images-idx3-ubyte.gz")[0])
    (tmp_path / "notes.png").write_text("not a picture")
    args = ("predict", trained_run, tmp_path / "notes.png", tmp_path / "digit.npy", tmp_path / "missing.png")
    result = invoke(*args, expect=1)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith("Error")] == [str(tmp_path / "digit.npy")]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 2 and "notes.png: cannot read" in errors[0] and "missing.png" in errors[1]
    rows = json.loads(invoke(*args, "--json", "--top-k", "3", expect=1).stdout)
    assert [("error" in row) for row in rows] == [True, False, True]
    good = rows[1]
    assert isinstance(good["class"], int) and len(good["top"]) == 3 and good["top"][0]["class"] == good["class"]
    probabilities = [t["probability"] for t in good["top"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_predict_bad_image_is_one_line(trained_run, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    result = invoke("predict", trained_run, tmp_path / "notes.png", expect=1)
    assert_one_line_error(result, r"notes.png: cannot read as an image")


def test_recipe_sets_values_and_flags_override_it(synthetic_dir, tmp_path):
    from xpcnn.training.config import RECIPES

    run = tmp_path / "run"
    invoke("train", "--recipe", "fast", "--epochs", "1", "--device", "cpu", "--data-dir", synthetic_dir, "--out", run)
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "fast" and config["epochs"] == 1
    assert {k: config[k] for k in RECIPES["fast"] if k != "epochs"} == {
        k: v for k, v in RECIPES["fast"].items() if k != "epochs"
    }
    result = invoke("train", "--resume", run, "--recipe", "best", expect=2)
    assert "--recipe cannot change when resuming (the run's is fast)" in result.output
    invoke("train", "--resume", run, "--recipe", "fast", "--epochs", "2")  # the same recipe is no change
    invoke("train", "--resume", run, "--epochs", "3")
    assert json.loads((run / "config.json").read_text())["recipe"] == "fast"  # still, after resuming without it


def test_plots_from_train_and_evaluate(trained_run, synthetic_dir, tmp_path, restore_tf32):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    options = ["--model", "lenet-bn", "--augment", "--elastic", "30", "--tf32", "--recalibrate-bn", "--plot"]
    invoke("train", *FAST, *options, "--data-dir", synthetic_dir, "--out", run)
    config = json.loads((run / "config.json").read_text())
    chosen = [config[k] for k in ("augment", "elastic", "elastic_sigma", "tf32", "recalibrate_bn")]
    assert chosen == [True, 30.0, 4.0, True, True]
    assert (run / "history.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads(invoke("evaluate", run, "--plot", "--json").output)
    assert report["plots"] == [str(run / "confusion.png"), str(run / "worst.png")]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in report["plots"])


def test_plot_without_matplotlib_fails_before_training(synthetic_dir, tmp_path, monkeypatch):
    from xpcnn.apps import plots

    def missing(*outputs):
        raise plots.PlotError(plots.PLOT_HINT)

    monkeypatch.setattr(plots, "require_matplotlib", missing)
    result = invoke("train", *FAST, "--plot", "--data-dir", synthetic_dir, "--out", tmp_path / "run", expect=1)
    assert_one_line_error(result, r'plotting needs matplotlib: pip install "xpcnn\[plot\]"')
    assert not (tmp_path / "run").exists()


def test_plot_outputs_are_checked_before_the_work(trained_run, synthetic_dir, tmp_path):
    """A folder in a picture's place is found before training or evaluating, and nothing is half written."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    (run / "history.png").mkdir(parents=True)
    result = invoke("train", *FAST, "--plot", "--data-dir", synthetic_dir, "--out", run, expect=1)
    assert_one_line_error(result, r"history.png exists and is not a regular file")
    assert sorted(path.name for path in run.iterdir()) == ["history.png"]
    evaluated = tmp_path / "evaluated"
    shutil.copytree(trained_run, evaluated)
    (evaluated / "worst.png").mkdir()
    result = invoke("evaluate", evaluated, "--plot", "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"worst.png exists and is not a regular file")
    assert not (evaluated / "confusion.png").exists()


def test_resuming_to_more_epochs_notes_a_schedule_that_stretches(synthetic_dir, tmp_path):
    """--epochs on resume recomputes a schedule from its length: the learning rate jumps to where the longer
    schedule stands. Only a constant schedule continues exactly, and only other schedules get the note."""
    for schedule in ("onecycle", "constant"):
        run = tmp_path / schedule
        invoke("train", *FAST, "--schedule", schedule, "--data-dir", synthetic_dir, "--out", run)
        result = invoke("train", "--resume", run, "--epochs", "2")
        notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
        if schedule == "constant":
            assert notes == []
        else:
            assert notes == [
                "note: the onecycle schedule was planned over 1 epoch(s) and now spans 2: the learning rate goes on "
                "from where the longer schedule stands, so the run will not match one started with --epochs 2 (only "
                "a constant schedule continues exactly)"
            ]


def test_a_run_trained_eagerly_on_jax_resumes_eagerly(synthetic_dir, tmp_path):
    pytest.importorskip("jax")
    run = tmp_path / "run"
    invoke("train", *FAST, "--backend", "jax", "--eager", "--data-dir", synthetic_dir, "--out", run)
    invoke("train", "--resume", run, "--epochs", "2", "--quiet")
    assert json.loads((run / "config.json").read_text())["compiled"] is False
    invoke("train", "--resume", run, "--epochs", "3", "--quiet", "--backend", "numpy")  # another backend: no --eager
    assert json.loads((run / "config.json").read_text())["backend"] == "numpy on cpu"


def test_a_failed_resume_leaves_the_run_as_it_was(trained_run, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "history.json").unlink()
    (run / "history.json").mkdir()
    before = (run / "config.json").read_bytes()
    result = invoke("train", "--resume", run, "--epochs", "2", "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"history.json exists and is not a regular file")
    assert (run / "config.json").read_bytes() == before


def test_predict_leaves_unreadable_files_to_its_own_errors(trained_run, synthetic_dir, tmp_path, monkeypatch):
    """A file the user may not read is one error line among the others' predictions (exit 1), not a usage
    error that predicts nothing (exit 2). Root reads any file, so click's own check is made to fail."""
    np.save(tmp_path / "digit.npy", read_idx(synthetic_dir / "t10k-images-idx3-ubyte.gz")[0])
    (tmp_path / "locked.png").write_text("not a picture")
    (tmp_path / "locked.png").chmod(0)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, *args, **kwargs: "locked" not in str(path) and access(path, *args))
    result = invoke("predict", trained_run, tmp_path / "digit.npy", tmp_path / "locked.png", expect=1)
    assert result.output.startswith(f"{tmp_path / 'digit.npy'}: ")
    assert_one_line_error(result, r"locked.png: (cannot open: Permission denied|cannot read as an image)")


def test_a_setting_out_of_range_names_its_flag(synthetic_dir):
    result = invoke("train", "--lr", "nan", "--device", "cpu", "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"^Error: --lr: learning rate must be a positive number of at least .*, got nan$")
    result = invoke("train", "--validation", "600", "--device", "cpu", "--data-dir", synthetic_dir, expect=1)
    assert_one_line_error(result, r"^Error: --validation: validation size 600 holds out 600 of 600 examples")


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch):
    from xpcnn.apps import cli, exits

    def broken():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "available_backends", broken)
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == exits.EXIT_BUG and isinstance(result.exception, SystemExit)
    assert "Traceback" in result.output and "ZeroDivisionError: a bug" in result.output
    assert result.output.strip().endswith(exits.BUG_REPORT)


def test_xpcnn_debug_shows_the_traceback_of_a_user_error(tmp_path):
    quiet = invoke("evaluate", tmp_path, expect=1)
    assert "Traceback" not in quiet.output
    loud = CliRunner().invoke(main, ["evaluate", str(tmp_path)], env={"XPCNN_DEBUG": "1"})
    assert loud.exit_code == 1 and "Traceback" in loud.output and "CheckpointError" in loud.output


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--out", ""],
        ["train", "--data-dir", ""],
        ["evaluate", ".", "--data-dir", ""],
        ["export", ".", "--output", ""],
        ["bench", "--output", ""],
    ],
)
def test_an_empty_path_is_refused_not_taken_for_here_or_for_none(args, tmp_path, monkeypatch):
    """``--out "$RUN"`` with RUN unset trained into the current directory; an empty --output or --data-dir was
    taken for one not given."""
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, expect=2)
    assert "an empty path names nothing" in result.output and list(tmp_path.iterdir()) == []


def test_a_run_that_fails_before_writing_leaves_no_folders_it_made(synthetic_dir, tmp_path):
    out = tmp_path / "a" / "b" / "run"
    result = invoke("train", *FAST, "--validation", 10**6, "--data-dir", synthetic_dir, "--out", out, expect=1)
    assert "--validation" in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "leave it out under"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "unset the launcher variables left here"),  # not torchrun's own advice
    ],
)
def test_nproc_under_a_launchers_variables_is_refused_for_what_it_is(environ, expected, tmp_path):
    result = invoke("train", "--nproc", 2, "--out", tmp_path / "run", env=environ, expect=2)
    assert "--nproc starts its own ranks" in result.output and expected in result.output


def test_predict_frames_a_picture_as_the_runs_own_images(trained_run, synthetic_dir, tmp_path):
    """A Fashion-MNIST run's pictures are framed as clothing (filling the 28 px), a digit run's as MNIST's digits,
    and a run on dark ink on light gets them so; predict's answer is the model's on the picture so prepared."""
    from xpcnn.apps.serve import DigitReader
    from xpcnn.backends.backend import get_backend
    from xpcnn.data.checkpoint import load_checkpoint
    from xpcnn.data.device_data import normalize_images
    from xpcnn.data.images import CLOTHING, DIGITS, load_image
    from xpcnn.training.runs import model_from_checkpoint, picture_framing
    from xpcnn.training.train import predict_probabilities

    clothing = tmp_path / "fashion"
    invoke("train", *FAST, "--dataset", "fashion-mnist", "--data-dir", synthetic_dir, "--out", clothing)
    assert picture_framing(load_checkpoint(clothing)) == CLOTHING
    digits = load_checkpoint(trained_run)
    assert picture_framing(digits) == DIGITS
    digits.meta["normalization"]["mean"] = 0.8
    assert picture_framing(digits).light_background
    picture = np.zeros((28, 28), np.uint8)
    picture[2:26, 8:20] = 200
    Image.fromarray(picture).save(tmp_path / "item.png")
    answer = json.loads(invoke("predict", clothing, tmp_path / "item.png", "--json", "--top-k", 10).output)[0]
    numpy = get_backend("numpy")
    model, norm = model_from_checkpoint(load_checkpoint(clothing), numpy)
    prepared = load_image(tmp_path / "item.png", CLOTHING)[None, None]
    expected = predict_probabilities(model, normalize_images(numpy, prepared, norm))[0]
    assert [row["probability"] for row in answer["top"]] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    assert DigitReader(load_checkpoint(clothing), numpy).framing == CLOTHING  # serve's pictures alike


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero(tmp_path):
    """It was reported at 0.00% in the JSON and a blue 0.0% cell of the plot, as if every image of it were wrong."""
    from helpers import write_synthetic_mnist

    from xpcnn.data.idx import write_idx

    data = write_synthetic_mnist(tmp_path / "data", n_train=300, n_test=60)
    labels = read_idx(data / "t10k-labels-idx1-ubyte.gz")
    write_idx(data / "t10k-labels-idx1-ubyte.gz", np.where(labels == 9, 0, labels).astype(np.uint8))
    run = tmp_path / "run"
    invoke("train", *FAST, "--data-dir", data, "--out", run)
    report = json.loads(invoke("evaluate", run, "--json").output)
    assert report["per_class_accuracy"]["9"] is None and report["per_class_accuracy"]["0"] is not None
    text = invoke("evaluate", run).output
    assert re.search(r"^\s+9\s+n/a\s+\(0 images\)$", text, re.MULTILINE), text
    if importlib.util.find_spec("matplotlib"):
        assert invoke("evaluate", run, "--plot").exit_code == 0


def test_xpcnn_debug_shows_the_traceback_of_a_picture_predict_cannot_read(trained_run, tmp_path):
    """README: XPCNN_DEBUG=1 shows the traceback of user errors; predict reports each file's own, and showed none."""
    missing = tmp_path / "missing.png"
    plain = invoke("predict", trained_run, missing, expect=1)
    assert "Traceback" not in plain.output and "missing.png" in plain.output
    debugged = CliRunner().invoke(main, ["predict", str(trained_run), str(missing)], env={"XPCNN_DEBUG": "1"})
    assert debugged.exit_code == 1 and "Traceback" in debugged.output and "ImageError" in debugged.output


def test_a_recipes_setting_the_chosen_model_cannot_use_is_left_out_not_refused(synthetic_dir, tmp_path):
    """--recipe best recalibrates batch norm; with --model seed (none) it trains, says so, records no
    recalibration, and --recalibrate-bn typed beside the same model is refused."""
    from xpcnn.data.checkpoint import load_checkpoint

    common = ["--recipe", "best", "--model", "seed", "--epochs", "1", "--backend", "numpy", "--device", "cpu"]
    run = tmp_path / "run"
    trained = invoke("train", *common, "--data-dir", synthetic_dir, "--out", run)
    assert "note: the best recipe's batch-norm recalibration is left out: seed has no batch norm" in trained.output
    assert json.loads((run / "config.json").read_text())["recalibrate_bn"] is True
    assert load_checkpoint(run).meta["state"]["history"][-1]["bn_recalibrated"] is False
    again = ["--recalibrate-bn", "--data-dir", synthetic_dir, "--out", tmp_path / "again"]
    refused = invoke("train", *common, *again, expect=1)
    assert "--recalibrate-bn: batch-norm recalibration asked for, but model seed" in refused.output


def test_a_run_refused_a_busy_directory_removes_nothing_of_it(synthetic_dir, tmp_path, monkeypatch):
    """Two runs into one new --out: the one refused the lock must not remove the folder the other holds."""
    from xpcnn.base.files import DirectoryBusyError
    from xpcnn.training import runs

    def busy(directory, wait=False):
        raise DirectoryBusyError(f"{directory} is in use by another xpcnn run")

    monkeypatch.setattr(runs, "locked_directory", busy)
    out = tmp_path / "new" / "run"
    result = invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", out, expect=1)
    assert "is in use by another xpcnn run" in result.output and out.is_dir()


def test_evaluates_text_counts_one_image_in_the_singular():
    from xpcnn.apps.report import evaluation_lines

    report = {
        "checkpoint": "run/checkpoint.npz",
        "dataset": "mnist",
        "images": 1,
        "loss": 0.5,
        "accuracy": 1.0,
        "per_class_accuracy": {"a": 1.0, "b": None, "c": None},
        "confusion_matrix": [[1, 0, 0], [0, 0, 0], [0, 0, 0]],
        "classes": ["a", "b", "c"],
    }
    lines = evaluation_lines(report, "after epoch 1")
    assert lines[0] == "run/checkpoint.npz (after epoch 1) on the mnist test set, 1 image"
    assert [line.split("(")[-1] for line in lines[3:6]] == ["1 image)", "0 images)", "0 images)"]


def test_a_stop_signal_after_the_last_checkpoint_lets_the_run_end_as_finished(synthetic_dir, tmp_path, monkeypatch):
    """A scheduler's SIGTERM as the run ends: it exited 143, its summary lost, and a requeued --resume of the
    finished run then failed (exit 2)."""
    import signal

    from xpcnn.apps import cli

    summary = cli.summary

    def signalled_summary(state):
        os.kill(os.getpid(), signal.SIGTERM)
        return summary(state)

    monkeypatch.setattr(cli, "summary", signalled_summary)
    result = invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", tmp_path / "run")
    assert result.output.splitlines()[-1].startswith("best test accuracy")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


def test_names_with_control_characters_forge_no_line_and_drive_no_terminal(synthetic_dir, tmp_path):
    from xpcnn.apps.exits import user_message
    from xpcnn.apps.report import evaluation_lines
    from xpcnn.base.errors import XpcnnError

    report = {
        "checkpoint": "a\nforged/checkpoint.npz",
        "dataset": "mnist",
        "images": 1,
        "loss": 0.5,
        "accuracy": 1.0,
        "per_class_accuracy": {"\x1b[31mred": 1.0},
        "confusion_matrix": [[1]],
        "classes": ["\x1b[31mred"],
    }
    lines = evaluation_lines(report, "after epoch 1")
    assert lines[0].startswith("a\\nforged/checkpoint.npz (after epoch 1)") and "\\x1b[31mred" in lines[3]
    assert not any("\x1b" in line for line in lines)
    assert user_message(XpcnnError("a\nb: no such run")) == "a\\nb: no such run"
    assert user_message(FileNotFoundError(2, "No such file or directory", "x\ny")) == "x\\ny: No such file or directory"
    assert user_message(RuntimeError("a library's first line\nand its second")) == "a library's first line"
    out = tmp_path / "new\nline"
    result = invoke("train", *FAST, "--data-dir", synthetic_dir, "--out", out)
    assert result.output.splitlines()[-1].endswith(f"run saved to {tmp_path}/new\\nline")
    result = invoke("export", out, "--format", "onnx", "--output", tmp_path / "no\nsuch" / "m.onnx", expect=2)
    assert result.output.splitlines()[-1] == f"Error: {tmp_path}/no\\nsuch is not a directory: create it first"
    result = invoke("train", "--resume", tmp_path / "new\nline", "--recipe", "fast", expect=2)
    assert result.output.splitlines()[-1] == "Error: --recipe cannot change when resuming (the run's is none)"


@pytest.mark.parametrize("option", ["--out", "--data-dir"])
def test_a_directory_option_naming_a_device_or_a_fifo_says_it_is_not_a_directory(option, tmp_path):
    """--out /dev/null failed after the data loaded, with "/dev/null: File exists"."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        result = invoke("train", option, path, expect=2)
        assert f"Invalid value for '{option}': '{path}' exists and is not a directory" in result.output


def test_predict_writes_a_file_names_control_characters_as_escapes(trained_run, tmp_path):
    """A name holding newlines forged output lines ("x.png: 3 (100.0%)") and broke an error's one line."""
    forged = tmp_path / "a\nfake.png: 3 (100.0%)\nb.npy"
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 12:16] = 255
    np.save(forged, image)
    missing = tmp_path / "missing\nError: nothing wrong.png"
    np.savez(tmp_path / "x.npz", image=image)
    result = invoke("predict", trained_run, forged, missing, tmp_path / "x.npz", expect=1)
    lines = result.output.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(str(tmp_path / "a\\nfake.png: 3 (100.0%)\\nb.npy") + ": ")
    assert "missing\\nError: nothing wrong.png" in lines[1] and "x.npz: a .npz archive holds several arrays" in lines[2]
