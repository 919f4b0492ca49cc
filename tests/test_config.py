"""TrainConfig's flip, crop, erase and dropout settings (their checks, the augmentation and model they build,
their flags) and the recipes."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import xpcnn
from xpcnn.apps import cli as cli_module
from xpcnn.apps.cli import main
from xpcnn.base.errors import ConfigError
from xpcnn.data.augment import Augmentation
from xpcnn.data.checkpoint import load_checkpoint, save_checkpoint
from xpcnn.models import build
from xpcnn.nn import Dropout
from xpcnn.training import config as config_module
from xpcnn.training.config import (
    MAX_CROP,
    RECIPES,
    TrainConfig,
    flag,
    make_augmentation,
    make_model,
    recipe_backend,
    recipe_dataset,
    recipes_for,
    resumed_backend,
)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("flip", "yes", r"flip must be True or False, got 'yes'"),
        ("flip", 1, r"flip must be True or False, got 1"),
        ("crop", -1, r"crop padding must be in \[0, 14\] pixels, got -1"),
        ("crop", MAX_CROP + 1, r"crop padding must be in \[0, 14\] pixels, got 15"),
        ("crop", 1.5, r"crop must be an integer, got 1.5"),
        ("crop", True, r"crop must be an integer, got True"),
        ("crop", "4", r"crop must be an integer, got '4'"),
        ("erase", -0.1, r"erase must be a probability in \[0, 1\], got -0.1"),
        ("erase", 1.5, r"erase must be a probability in \[0, 1\], got 1.5"),
        ("erase", float("nan"), r"erase must be a probability in \[0, 1\], got nan"),
        ("erase", True, r"erase must be a number, got True"),
        ("erase", "0.5", r"erase must be a number, got '0.5'"),
        ("dropout", -0.1, r"dropout must be a probability in \[0, 1\), got -0.1"),
        ("dropout", 1.0, r"dropout must be a probability in \[0, 1\), got 1.0"),
        ("dropout", float("nan"), r"dropout must be a probability in \[0, 1\), got nan"),
        ("dropout", False, r"dropout must be a number or None, got False"),
        ("dropout", "0.1", r"dropout must be a number or None, got '0.1'"),
    ],
)
def test_bad_flip_and_crop_settings_are_a_config_error_naming_them(setting, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**{setting: value})
    assert error.value.setting == setting
    images = np.zeros((8, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    with pytest.raises(ConfigError) as error:
        xpcnn.fit("seed", (images, np.arange(8) % 2), backend="numpy", **{setting: value})
    assert error.value.setting == setting


def test_flip_and_crop_settings_keep_their_values_and_default_to_off():
    config = TrainConfig(flip=np.bool_(True), crop=np.int64(MAX_CROP), erase=np.float32(0.25))
    assert (config.flip, config.crop, config.erase) == (True, MAX_CROP, 0.25) and type(config.crop) is int
    assert type(config.erase) is float and TrainConfig(erase=1).erase == 1.0
    assert (TrainConfig().flip, TrainConfig().crop, TrainConfig().erase) == (False, 0, 0.0)
    # a checkpoint's configuration from before these settings reads as off
    older = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("flip", "crop", "erase")}
    assert TrainConfig.from_dict(older) == TrainConfig()


def test_flips_and_crops_build_the_augmentation_alone_or_with_the_warps():
    identity = {"max_shift": 0, "max_rotation": 0, "max_scale": 0, "max_shear": 0}
    assert make_augmentation(TrainConfig()) is None
    assert make_augmentation(TrainConfig(flip=True)) == Augmentation(**identity, flip=True)
    assert make_augmentation(TrainConfig(crop=4)) == Augmentation(**identity, crop=4)
    assert make_augmentation(TrainConfig(flip=True, crop=2, augment=True)) == Augmentation(flip=True, crop=2)
    both = make_augmentation(TrainConfig(flip=True, crop=3, elastic=10.0, elastic_sigma=5.0))
    assert both == Augmentation(**identity, elastic_alpha=10.0, elastic_sigma=5.0, flip=True, crop=3)
    assert make_augmentation(TrainConfig(augment=True)) == Augmentation()  # digits keep their warps alone
    assert make_augmentation(TrainConfig(erase=0.5)) == Augmentation(**identity, erase=0.5)
    assert make_augmentation(TrainConfig(flip=True, crop=2, erase=1.0)) == Augmentation(
        **identity, flip=True, crop=2, erase=1.0
    )


def dropouts(model) -> list[float]:
    return [layer.p for layer in model.modules() if isinstance(layer, Dropout)]


def test_dropout_defaults_to_the_models_own_and_sets_every_dropout_layer_when_named():
    assert TrainConfig().dropout is None and type(TrainConfig(dropout=np.float32(0.5)).dropout) is float
    older = {k: v for k, v in TrainConfig().to_dict().items() if k != "dropout"}  # a run from before the setting
    assert TrainConfig.from_dict(older) == TrainConfig()
    own = make_model(TrainConfig(model="resnet-small", seed=3))
    assert dropouts(own) == [0.1] and repr(own) == repr(build("resnet-small", seed=3))
    for name, p in [("resnet-small", 0.0), ("deepnet", 0.2), ("convnet", 0.5)]:
        model = make_model(TrainConfig(model=name, seed=3, dropout=p))
        assert dropouts(model) and set(dropouts(model)) == {p}, name
        same_weights = build(name, seed=3).state_dict()  # the setting changes no initial weight
        assert all(np.array_equal(value, same_weights[key]) for key, value in model.state_dict().items())
    assert dropouts(make_model(TrainConfig(model="lenet-bn", dropout=0.0))) == []  # none asked, none there
    with pytest.raises(ConfigError, match="dropout 0.3 asked for, but model lenet-bn has no dropout layer") as error:
        TrainConfig(model="lenet-bn", dropout=0.3)
    assert error.value.setting == "dropout"


@pytest.mark.parametrize(
    "settings, flags, message",
    [
        ({"model": "lenet", "recalibrate_bn": True}, ["--model", "lenet", "--recalibrate-bn"], "model lenet has no"),
        ({"optimizer": "adam", "momentum": 0.5}, ["--optimizer", "adam", "--momentum", "0.5"], "is SGD's: adam has"),
        ({"optimizer": "adamw", "momentum": 0.0}, ["--optimizer", "adamw", "--momentum", "0"], "momentum 0.0 is SGD's"),
        ({"elastic_sigma": 8.0}, ["--elastic-sigma", "8"], "elastic sigma 8.0 given without an elastic distortion"),
    ],
)
def test_settings_that_would_change_nothing_are_refused_for_a_new_run(settings, flags, message):
    """A setting the run cannot use is a mistake to say, not to drop: the weights would be those without it (and
    the history claimed a recalibration that never ran)."""
    config = TrainConfig(**settings)  # a checkpoint of a run that gave it before is still read
    config.check_every_setting_used()  # named by none (a recipe's): left to the run
    with pytest.raises(ConfigError, match=message) as error:
        config.check_every_setting_used(given=settings)
    where_used = TrainConfig(**{**settings, "model": "lenet-bn", "optimizer": "sgd", "elastic": 12.0})
    where_used.check_every_setting_used(given=settings)
    result = run_cli("train", *flags, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"Error: {flag(error.value.setting)}: {error.value}"], result.output


@pytest.mark.parametrize("flags", [["--optimizer", "adam", "--momentum", "0.9"], ["--elastic-sigma", "4"]])
def test_such_a_flag_is_refused_even_at_its_default_value(flags):
    result = run_cli("train", *flags, "--device", "cpu")
    assert result.exit_code == 1 and error_lines(result)[0].startswith(f"Error: {flags[-2]}: "), result.output
    TrainConfig(optimizer="adam").check_every_setting_used(given={"optimizer"})  # momentum's default, not given


def test_fit_trains_with_the_dropout_setting_as_with_the_layers_set_by_hand():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10
    common = {"backend": "numpy", "epochs": 1, "batch_size": 16, "seed": 2}
    by_setting = xpcnn.fit("convnet", (images, labels), dropout=0.0, **common)
    by_hand = build("convnet", seed=2)
    for layer in by_hand.modules():
        if isinstance(layer, Dropout):
            layer.p = 0.0
    xpcnn.fit(by_hand, (images, labels), **common)
    trained = by_setting.optimizer.model
    assert by_setting.config.dropout == 0.0 and dropouts(trained) == [0.0]
    for key, value in trained.state_dict().items():
        np.testing.assert_array_equal(value, by_hand.state_dict()[key], err_msg=key)
    with_own = xpcnn.fit("convnet", (images, labels), **common).optimizer.model
    assert not np.array_equal(with_own.state_dict()["8.weight"], trained.state_dict()["8.weight"])
    with pytest.raises(ConfigError, match="dropout applies to a model given by name") as error:
        xpcnn.fit(build("convnet"), (images, labels), dropout=0.0, **common)
    assert error.value.setting == "dropout"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def test_the_command_line_refuses_a_crop_out_of_range_in_one_line():
    result = run_cli("train", "--crop", "15", "--device", "cpu")  # the range --help shows, checked by click
    assert result.exit_code == 2 and error_lines(result) == [
        "Error: Invalid value for '--crop': 15 is not in the range 0<=x<=14."
    ], result.output
    with pytest.raises(ConfigError, match=r"crop padding must be in \[0, 14\] pixels, got 15"):
        TrainConfig(crop=15)  # the library's own check
    result = run_cli("train", "--crop", "-1")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert re.search(r"Invalid value for '--crop'", error_lines(result)[0])
    result = run_cli("train", "--crop", "two")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    for value in ("1.5", "-0.5", "half"):
        result = run_cli("train", "--erase", value)
        assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
        assert "Invalid value for '--erase'" in error_lines(result)[0]
    assert "--flip / --no-flip" in run_cli("train", "--help").output
    assert "--erase P" in run_cli("train", "--help").output and "--dropout P" in run_cli("train", "--help").output
    for value in ("1", "-0.1", "none"):
        result = run_cli("train", "--dropout", value)
        assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
        assert "Invalid value for '--dropout'" in error_lines(result)[0]
    assert "--ema DECAY" in run_cli("train", "--help").output
    for value in ("1", "-0.1", "fast"):
        result = run_cli("train", "--ema", value)
        assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
        assert "Invalid value for '--ema'" in error_lines(result)[0]
    result = run_cli("train", "--model", "lenet-bn", "--dropout", "0.3", "--device", "cpu")
    assert result.exit_code == 1 and error_lines(result) == [
        "Error: --dropout: dropout 0.3 asked for, but model lenet-bn has no dropout layer"
    ], result.output


def test_the_command_line_flags_reach_the_run_configuration(synthetic_dir, tmp_path):
    fast = ["--model", "seed", "--epochs", "1", "--batch-size", "100", "--device", "cpu", "--quiet"]
    run = tmp_path / "run"
    flags = ["--flip", "--crop", "3", "--erase", "0.5", "--dropout", "0", "--ema", "0.99"]
    result = run_cli("train", *fast, *flags, "--data-dir", synthetic_dir, "--out", run)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["flip"], config["crop"], config["erase"], config["dropout"]) == (True, 3, 0.5, 0.0)
    assert config["ema"] == 0.99
    result = run_cli("train", "--resume", run, "--crop", "2")
    assert result.exit_code == 2 and "--crop cannot change when resuming" in result.output, result.output
    assert "trained with --crop 3" in result.output
    result = run_cli("train", "--resume", run, "--dropout", "0.3")
    assert result.exit_code == 2 and "--dropout cannot change when resuming" in result.output, result.output
    result = run_cli("train", "--resume", run, "--ema", "0")
    assert result.exit_code == 2 and "--ema cannot change when resuming" in result.output, result.output
    plain = tmp_path / "plain"  # no --dropout: the model's own, recorded as None
    assert run_cli("train", *fast, "--data-dir", synthetic_dir, "--out", plain).exit_code == 0
    result = run_cli("train", "--resume", plain, "--dropout", "0.3")
    assert result.exit_code == 2 and "was trained with no --dropout " in result.output, result.output


@pytest.mark.parametrize(
    "recipe, device, gpu, installed, taken, missing",
    [
        ("quick", "cpu", False, True, "jax", None),
        ("quick", "auto", False, True, "jax", None),
        ("quick", None, False, True, "jax", None),
        ("quick", "cpu", True, True, "jax", None),
        ("quick", "auto", True, True, None, None),  # auto picks the GPU, and the default backend there
        ("quick", "auto", True, False, None, None),  # so nothing is missing there either
        ("quick", "cuda", True, True, None, None),
        ("quick", "cuda:1", True, True, None, None),
        ("quick", "cpu", False, False, None, "jax"),  # JAX not installed: NumPy, the default, and a note
        ("best", "auto", False, False, None, "jax"),
        ("fashion", None, False, False, None, "jax"),
        ("fashion", "cpu", False, True, "jax", None),
        ("fashion", "cuda", True, True, None, None),
        ("fast", "cpu", False, True, None, None),
        ("fast", "cpu", False, False, None, None),
        ("best", "cpu", False, True, "jax", None),
        ("best", "cuda", True, True, None, None),
        (None, "cpu", False, True, None, None),
        (None, "cpu", False, False, None, None),
    ],
)
def test_a_recipe_picks_its_backend_only_on_the_cpu_and_names_it_where_it_is_missing(
    monkeypatch, recipe, device, gpu, installed, taken, missing
):
    probes = []  # cuda_problem is not cached and may take a second where CUDA is broken: at most one probe
    monkeypatch.setattr(config_module, "cuda_problem", lambda: probes.append(1) or (None if gpu else "no GPU here"))
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: object() if installed else None)
    assert recipe_backend(recipe, device) == (taken, missing)
    assert len(probes) <= 1


def test_a_recipe_run_without_its_backend_says_so_and_trains_on_numpy(monkeypatch, synthetic_dir, tmp_path):
    # As on a machine without JAX (patched where the command looks them up).
    monkeypatch.setattr(cli_module, "preferred_backend", lambda name, trained_on, device: (None, "jax"))
    run = tmp_path / "run"
    common = ["--recipe", "quick", "--epochs", "1", "--device", "cpu", "--data-dir", synthetic_dir, "--out", run]
    result = run_cli("train", *common)
    assert result.exit_code == 0, result.output
    note = "note: the quick recipe's seconds were measured on jax, which is not installed: this trains on numpy"
    assert note in result.output, result.output
    assert json.loads((run / "config.json").read_text())["backend"].startswith("numpy")
    quiet = run_cli("train", *common[:-1], tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and "note:" not in quiet.output, quiet.output
    named = run_cli("train", *common[:-1], tmp_path / "named", "--backend", "numpy")
    assert named.exit_code == 0 and "note:" not in named.output, named.output


@pytest.mark.slow
def test_the_quick_recipe_trains_on_jax_unless_a_backend_is_named(synthetic_dir, tmp_path):
    pytest.importorskip("jax")
    common = ["--recipe", "quick", "--epochs", "1", "--device", "cpu", "--quiet", "--data-dir", synthetic_dir]
    for named, expected in (([], "jax"), (["--backend", "numpy"], "numpy")):
        run = tmp_path / expected
        result = run_cli("train", *common, *named, "--out", run)
        assert result.exit_code == 0, result.output
        config = json.loads((run / "config.json").read_text())
        assert config["backend"].startswith(expected) and config["recipe"] == "quick", config
        assert {k: config[k] for k in RECIPES["quick"] if k != "epochs"} == {
            k: v for k, v in RECIPES["quick"].items() if k != "epochs"
        }


@pytest.mark.parametrize(
    "trained_on, device, gpu, installed, expected",
    [
        ("jax on cpu", "auto", False, True, ("jax", None)),
        ("jax on cpu", "cpu", True, True, ("jax", None)),
        ("jax on cpu", "auto", False, False, (None, "jax")),
        ("jax on cpu", "cuda", True, True, (None, None)),  # another device: its default
        ("numpy on cpu", "cuda:1", True, True, (None, None)),
        ("cupy on cuda:0 (NVIDIA H100 80GB HBM3)", "auto", True, True, ("cupy", None)),
        ("cupy on cuda:0 (NVIDIA H100 80GB HBM3)", "cuda:1", True, True, ("cupy", None)),
        ("cupy on cuda:0 (NVIDIA H100 80GB HBM3)", "auto", False, True, (None, "cupy")),
        ("cupy on cuda:0 (NVIDIA H100 80GB HBM3)", "cpu", False, True, (None, None)),
        ("array-api-strict on cpu", "auto", False, True, ("array-api-strict", None)),
        ("", "auto", False, True, (None, None)),  # a checkpoint from before it was recorded
        ("abacus on cpu", "auto", False, True, (None, None)),
    ],
)
def test_a_resumed_run_continues_on_the_backend_it_trained_on_where_it_can(
    monkeypatch, trained_on, device, gpu, installed, expected
):
    monkeypatch.setattr(config_module, "cuda_problem", lambda: None if gpu else "no GPU here")
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: object() if installed else None)
    assert resumed_backend(trained_on, device) == expected


@pytest.mark.slow
def test_a_jax_run_resumes_on_jax_unless_a_backend_is_named(synthetic_dir, tmp_path):
    """As the printed "continue with: xpcnn train --resume RUN" runs it: where JAX continues exactly."""
    pytest.importorskip("jax")
    run = tmp_path / "run"
    common = ["--model", "seed", "--device", "cpu", "--data-dir", synthetic_dir, "--quiet"]
    assert run_cli("train", *common, "--backend", "jax", "--epochs", "1", "--out", run).exit_code == 0
    resumed = run_cli("train", "--resume", run, "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert "with jax on cpu, 2 epoch(s), resuming after epoch 1" in resumed.output
    assert json.loads((run / "config.json").read_text())["backend"] == "jax on cpu"
    named = run_cli("train", "--resume", run, "--epochs", "3", "--backend", "numpy", "--quiet")
    assert named.exit_code == 0 and json.loads((run / "config.json").read_text())["backend"] == "numpy on cpu"


def test_a_resumed_run_whose_backend_cannot_run_here_says_so(monkeypatch, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--model", "seed", "--device", "cpu", "--data-dir", synthetic_dir, "--quiet"]
    assert run_cli("train", *common, "--epochs", "1", "--out", run).exit_code == 0
    checkpoint = load_checkpoint(run)  # as if trained on a GPU, and resumed on this machine
    gpu = "cupy on cuda:0 (NVIDIA H100 80GB HBM3)"
    meta = {**checkpoint.meta, "trained_on": gpu}
    save_checkpoint(run / "checkpoint.npz", meta, checkpoint.model_state, checkpoint.optimizer_state)
    monkeypatch.setattr(config_module, "cuda_problem", lambda: "no GPU here")
    resumed = run_cli("train", "--resume", run, "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert f"note: the run trained on {gpu}, which cannot run here: it continues on numpy on cpu" in resumed.output


def test_every_recipe_candidate_builds_a_ten_class_model_and_unknown_names_are_refused(tmp_path):
    path = Path(__file__).resolve().parent.parent / "scripts" / "recipe_candidates.py"
    spec = importlib.util.spec_from_file_location("recipe_candidates", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images = np.zeros((2, 1, 28, 28), np.float32)
    for recipe, candidates in script.CANDIDATES.items():
        for name, (builder, settings) in candidates.items():
            assert builder(0).forward(images).shape == (2, 10), (recipe, name)
            TrainConfig.from_dict({**script.FASHION, **settings} if recipe == "fashion" else settings)
    result = subprocess.run(
        [sys.executable, str(path), str(tmp_path), "quick", "lenet-bn", "resnet-9000"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown candidates resnet-9000" in result.stderr, result.stderr


def test_each_dataset_has_the_recipes_chosen_on_it():
    assert [recipe_dataset(name) for name in ("quick", "fast", "fashion", "best")] == [
        "mnist",
        "mnist",
        "fashion-mnist",
        "mnist",
    ]
    assert recipes_for("mnist") == ["quick", "fast", "best"]
    assert recipes_for("fashion-mnist") == ["fashion"]
    assert recipes_for("kmnist") == []


def test_a_recipe_run_on_another_dataset_than_its_own_says_so(synthetic_dir, tmp_path):
    common = ["--model", "seed", "--epochs", "1", "--backend", "numpy", "--data-dir", synthetic_dir]
    result = run_cli("train", "--recipe", "fast", "--dataset", "fashion-mnist", *common, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    note = "note: the fast recipe was chosen on mnist, not fashion-mnist (for fashion-mnist: --recipe fashion)"
    assert note in result.output, result.output
    result = run_cli("train", "--recipe", "fast", *common, "--out", tmp_path / "b")
    assert result.exit_code == 0 and "chosen on" not in result.output, result.output
    result = run_cli(
        "train", "--recipe", "fast", "--dataset", "fashion-mnist", *common, "--quiet", "--out", tmp_path / "c"
    )
    assert result.exit_code == 0 and "note:" not in result.output, result.output


@pytest.mark.slow
def test_the_fashion_recipe_picks_its_dataset_flips_and_crops_unless_flags_say_otherwise(synthetic_dir, tmp_path):
    common = ["--recipe", "fashion", "--model", "seed", "--epochs", "1", "--backend", "numpy", "--quiet"]
    run = tmp_path / "fashion"
    result = run_cli("train", *common, "--data-dir", synthetic_dir, "--out", run)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["flip"], config["crop"], config["model"]) == ("fashion-mnist", True, 2, "seed")
    run = tmp_path / "digits"
    result = run_cli("train", *common, "--dataset", "mnist", "--no-flip", "--data-dir", synthetic_dir, "--out", run)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["flip"], config["crop"]) == ("mnist", False, 2)


@pytest.mark.slow
def test_a_recalibrated_candidate_prints_its_figures_before_and_after_as_the_flag_gives_them(synthetic_dir):
    """recipe_candidates.py trains a candidate with recalibrate_bn without it, prints the last epoch, then
    recalibrates: the second line is what fit(..., recalibrate_bn=True) records."""
    pytest.importorskip("jax")
    path = Path(__file__).resolve().parent.parent / "scripts" / "recipe_candidates.py"
    options = ["--validation", "100", "--epochs-cap", "2", "--device", "cpu"]
    name = "resnet-30-epochs-recalibrated"
    done = subprocess.run(
        [sys.executable, str(path), str(synthetic_dir), "fashion", name, *options], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 2] and lines[-1]["recalibrated"]
    spec = importlib.util.spec_from_file_location("recipe_candidates", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    build, settings = script.CANDIDATES["fashion"][name]
    flagged = xpcnn.fit(
        build(0),
        "fashion-mnist",
        validation=100,
        backend=xpcnn.get_backend("jax", "cpu"),
        data_dir=synthetic_dir,
        seed=0,
        **{**script.FASHION, **settings, "epochs": 2},
    ).records[-1]
    assert flagged["bn_recalibrated"]
    assert lines[-1]["val_accuracy"] == flagged["val_accuracy"]
    assert lines[-1]["val_loss"] == pytest.approx(flagged["val_loss"], rel=1e-6)
    assert lines[-2]["val_loss"] != pytest.approx(flagged["val_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("name", "candidate_name", "base"),
    [
        ("fashion", "resnet-48-30-epochs-lr0.025-no-dropout", "FASHION"),  # docs/bench/fashion-candidates-2026-12-06j
        ("best", "resnet-no-dropout", "BEST"),  # docs/bench/best-candidates-2026-12-06c
    ],
)
def test_a_recipe_trains_the_candidate_that_won_its_last_round(name, candidate_name, base):
    """The recipe is the script's candidate, model and settings alike."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "recipe_candidates.py"
    spec = importlib.util.spec_from_file_location("recipe_candidates", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    builder, settings = script.CANDIDATES[name][candidate_name]
    config = TrainConfig.from_dict(RECIPES[name])
    model, candidate = make_model(config), builder(config.seed)
    assert repr(model) == repr(candidate) and dropouts(model) == [0.0]
    assert all(np.array_equal(value, candidate.state_dict()[key]) for key, value in model.state_dict().items())
    chosen = {**getattr(script, base), **settings}
    assert {key: getattr(config, key) for key in chosen} == chosen
