"""The ``xpcnn`` command line: each command's options and messages; the work happens in the library."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import sys
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..backends.backend import BACKEND_NAMES, cuda_problem, get_backend, set_tf32
from ..backends.diagnostics import available_backends, gpu_names
from ..backends.distributed import check_backend, rank_from_environment
from ..backends.ranks import join, prepare
from ..base.errors import ConfigError, NonFiniteOutputs, XpcnnError, printable
from ..base.files import check_writable
from ..base.stopping import stop_on_signals
from ..data.checkpoint import CHECKPOINT_NAME, checkpoint_path, load_checkpoint
from ..data.data import DATASETS, TEST_FILES, cache_dir, find_data_dir, get_spec, load_dataset
from ..data.device_data import DeviceSplit, normalize_images
from ..data.images import ImageError, load_image
from ..models import MODELS
from ..optim import OPTIMIZERS
from ..training.config import RECIPES, TrainConfig, preferred_backend, recipe
from ..training.display import Progress
from ..training.ensemble import evaluate_ensemble
from ..training.fitting import require_rebuildable_run
from ..training.runs import (
    RUNS_ROOT,
    check_no_run,
    check_ranks_get_images,
    check_same_data,
    check_same_task,
    checkpoint_config,
    default_run_dir,
    model_from_checkpoint,
    picture_framing,
    ran_eagerly,
    recorded_data_dir,
    remove_if_empty,
    resumed_config,
    run_dir_has_run,
    stored_config,
    summary,
    train_run,
)
from ..training.schedules import SCHEDULES
from ..training.step import compiles
from ..training.train import RunState, predict_probabilities
from ..training.train import evaluate as evaluate_model
from ..training.tta import evaluate_tta
from ..training.tta import views as test_time_views
from . import export as exporting
from . import plots
from .exits import FriendlyGroup, announce, debug_traceback, friendly_errors, tell
from .options import (
    NonEmptyPath,
    allow_other_data_option,
    augmentation_options,
    check_not_a_run_file,
    device_options,
)
from .report import evaluation_lines, evaluation_report, train_notes


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xpcnn")
def main():
    """xpcnn: train convolutional networks on handwritten digits, on NumPy, CuPy, PyTorch or JAX.

    \b
    Quick start:
      xpcnn train                      # convnet on MNIST, GPU if there is one
      xpcnn evaluate runs/<run>        # accuracy, per-class accuracy, confusion matrix
      xpcnn predict runs/<run> digit.png
      xpcnn export runs/<run> --format onnx --output model.onnx
      xpcnn serve runs/<run>           # draw digits in the browser
    """


BENCH_MODELS = ("seed", "lenet", "convnet")
TF32_HELP = "Let float32 matrix products on NVIDIA GPUs use TF32 tensor cores (10-bit mantissas): faster, less exact."
EAGER_HELP = "JAX: run each operation as it comes instead of compiled programs (for debugging)."


@main.command()
@click.option(
    "--recipe",
    "recipe_name",
    type=click.Choice(list(RECIPES)),
    help="Start from a named recipe (quick: 99% in seconds on a CPU; fast: 99% in 2 epochs; best; fashion).",
)
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="mnist", show_default=True)
@click.option("--data-dir", type=NonEmptyPath(file_okay=False), help="Directory of the four IDX files (.gz or not).")
@click.option("--model", type=click.Choice(list(MODELS)), default=TrainConfig.model, show_default=True)
@device_options
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=TrainConfig.optimizer, show_default=True)
@click.option(
    "--momentum", type=float, default=TrainConfig.momentum, show_default=True, help="SGD (Nesterov) momentum."
)
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=TrainConfig.schedule, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=TrainConfig.seed, show_default=True)
@click.option(
    "--validation",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Training images held out for validation.",
)
@click.option(
    "--label-smoothing",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=TrainConfig.label_smoothing,
    show_default=True,
    help="Train against (1 - e) * one-hot + e / classes (the train loss shown is against those targets; "
    "validation and test losses are plain cross-entropy).",
)
@click.option(
    "--dropout",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=None,
    metavar="P",
    help="Set every dropout layer of the model to drop with probability P  [default: the model's own]",
)
@click.option(
    "--ema",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=TrainConfig.ema,
    metavar="DECAY",
    help="Keep a moving average of the weights with this decay (e.g. 0.999), evaluate it and keep it; 0 for none.",
    show_default=True,
)
@augmentation_options
@click.option(
    "--recalibrate-bn/--no-recalibrate-bn",
    default=TrainConfig.recalibrate_bn,
    show_default=True,
    help="After the last epoch, re-estimate batch-norm statistics on the training images without augmentation.",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=TrainConfig.log_every,
    show_default=True,
    help="Steps between progress updates (the only host syncs inside an epoch).",
)
@click.option("--out", type=NonEmptyPath(file_okay=False), help="Run directory [default: runs/<model>-<time>].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="Continue the run in this directory.")
@click.option("--tf32", is_flag=True, help=TF32_HELP)
@click.option("--plot", is_flag=True, help="Also write the training curves to history.png in the run directory.")
@click.option("--eager", is_flag=True, help=EAGER_HELP)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Train data-parallel over this many processes on this machine (--batch-size is the global batch; "
    "under torchrun, mpiexec or srun leave it out: their ranks are read from the environment).",
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress: print only errors and the final summary (and --plot's file)."
)
@allow_other_data_option
@click.pass_context
@friendly_errors
def train(
    ctx,
    recipe_name,
    data_dir,
    device,
    backend,
    out,
    resume,
    tf32,
    plot,
    eager,
    nproc,
    quiet,
    allow_other_data,
    **options,
):
    """Train a model, saving config, history and checkpoints to a run directory."""
    launching = bool(nproc and nproc > 1)  # this process starts the ranks, and does not train itself
    try:
        placement = rank_from_environment()
    except XpcnnError:
        if launching:  # a launcher's variables left in the shell: their advice would not help --nproc
            raise click.UsageError("--nproc starts its own ranks: unset the launcher variables left here") from None
        raise
    if placement.launcher == "xpcnn":
        from .launch import end_with_launcher

        end_with_launcher()
    if launching and placement.world_size > 1:
        raise click.UsageError(
            f"--nproc starts its own ranks: leave it out under {placement.launcher}, which started "
            f"{placement.world_size} already"
        )
    given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    recorded_recipe = None  # a resumed run's, which its config.json keeps
    if resume is not None:
        recorded_recipe = stored_config(Path(resume)).get("recipe")
        recorded_recipe = recorded_recipe if isinstance(recorded_recipe, str) and recorded_recipe in RECIPES else None
        if recipe_name not in (None, recorded_recipe):
            raise click.UsageError(f"--recipe cannot change when resuming (the run's is {recorded_recipe or 'none'})")
        if not run_dir_has_run(Path(resume)):
            stopped = " (its run stopped before its first one)" if (Path(resume) / "config.json").exists() else ""
            raise click.UsageError(
                f"{printable(resume)} holds no {CHECKPOINT_NAME} to continue{stopped}: start it afresh with --out"
            )
        checkpoint = load_checkpoint(resume)
        require_rebuildable_run(checkpoint_config(checkpoint), resume)  # before its settings are judged
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise click.UsageError("--out and --resume name different directories")
        try:
            config = resumed_config(checkpoint, Path(resume), {k: options[k] for k in given})
        except ConfigError as exc:
            raise click.UsageError(printable(exc)) from None  # names its flags, and the run's own values
        out = Path(resume)
        data_dir = data_dir or recorded_data_dir(checkpoint, out)
    else:
        checkpoint = None
        if recipe_name:
            options.update({k: v for k, v in recipe(recipe_name).items() if k not in given})
        config = TrainConfig.from_dict(options)
        config.check_every_setting_used(given=given)
        if out is None:
            made = () if RUNS_ROOT.exists() else (RUNS_ROOT,)  # removed with the run's own if the run fails first
            out = default_run_dir(config)
            ctx.call_on_close(functools.partial(remove_if_empty, out, *made))  # a run that fails first leaves no folder
        out = Path(out)
        try:
            check_no_run(out)  # before the data is loaded or any rank starts; train_run checks again, holding the lock
        except XpcnnError as exc:
            raise click.UsageError(printable(exc)) from None
    if plot:
        plots.require_matplotlib(out / "history.png")
    set_tf32(tf32)
    trained_on = str(checkpoint.meta.get("trained_on", "")) if checkpoint else ""
    taken, missing = (None, None) if backend else preferred_backend(recipe_name, trained_on, device)
    backend = backend or taken
    if not launching:
        prepare(backend)  # JAX's ranks meet before JAX does anything
    chosen = get_backend(backend, device)
    if checkpoint and chosen.name == "jax" and not launching and placement.world_size == 1:
        eager = eager or ran_eagerly(out)  # an --eager run continues exactly; several ranks run compiled
    if launching:
        from ..backends.distributed import check_batch_size
        from .launch import check_before_ranks, child_arguments, launch

        check_before_ranks(out)
        check_backend(chosen, nproc)
        check_batch_size(config.batch_size, nproc)
        if eager and chosen.name == "jax":  # here once, not by each rank after loading the data
            raise click.UsageError("data-parallel training on the jax backend runs compiled: leave out --eager")
        # Once, here: a bad data directory is one line, not one per rank, and a download happens once.
        dataset = load_dataset(config.dataset, data_dir, progress=not quiet)
        check_ranks_get_images(config, dataset, nproc, checkpoint, allow_other_data)
        if sys.argv[1:2] != ["train"]:  # the ranks rerun this command line
            raise click.UsageError("--nproc works from the command line (xpcnn train ... --nproc N)")
        command = [sys.executable, "-m", "xpcnn", "train", *child_arguments(sys.argv[2:], str(out))]
        sys.exit(launch(nproc, command))
    communicator = join(chosen)
    quiet = quiet or not communicator.is_root  # one rank speaks for all
    dataset = load_dataset(config.dataset, data_dir, progress=not quiet)
    if not quiet:
        tell(  # a log on a full disk loses its lines, not the run, as the progress does
            f"training {config.model} on {config.dataset} ({len(dataset.train_labels):,} train / "
            f"{len(dataset.test_labels):,} test images) with {chosen}, {config.epochs} epoch(s)"
            + (f", resuming {RunState(**checkpoint.meta['state']).position()}" if checkpoint else "")
        )
        resumed = checkpoint_config(checkpoint) if checkpoint else None
        wanted = (trained_on if checkpoint else missing) if missing else None  # the backend that cannot run here
        for note in train_notes(config, recipe_name, resumed, wanted, chosen):
            tell(f"note: {note}")
    environment = {
        "data_dir": dataset.record()["directory"],
        "backend": chosen.describe(),
        "tf32": tf32,
        "recipe": recipe_name or recorded_recipe,
        "compiled": compiles(chosen.name, eager),
    }
    with stop_on_signals():  # train_run's scope, kept open: a stop once the run has ended lets it end as finished
        state = train_run(
            config,
            chosen,
            dataset,
            out,
            resume=checkpoint,
            progress=Progress(sys.stderr, quiet=quiet),
            environment=environment,
            allow_other_data=allow_other_data,
            eager=eager,
            communicator=communicator,
        )
        communicator.close()
        if not communicator.is_root:
            return
        if plot:
            tell(f"training curves: {printable(plots.plot_history(state.history, out / 'history.png'))}")
        result = summary(state)
        click.echo(
            f"best test accuracy {result['best_test_accuracy']:.2%} (epoch {result['best_epoch']}), "
            f"{result['train_seconds']:.1f} s of training; run saved to {printable(out)}"
        )


@main.command()
@click.argument("run", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True))
@click.option("--data-dir", type=NonEmptyPath(file_okay=False), help="Directory of the two t10k IDX files (.gz or not)")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--plot",
    is_flag=True,
    help="Also write confusion.png and worst.png (the most confident mistakes) beside the checkpoint.",
)
@click.option(
    "--tta",
    is_flag=True,
    help="Also the accuracy with test-time augmentation: the softmax averaged over the image and its 1-pixel "
    "shifts (and their mirror images, for a model trained with flips). Reported apart.",
)
@click.option(
    "--ensemble",
    "members",
    multiple=True,
    metavar="RUN_OR_CHECKPOINT",
    type=click.Path(exists=True),
    help="Also the accuracy of an ensemble: this model's softmax averaged with that of each run named "
    "(repeat the option), trained on the same dataset. Reported apart.",
)
@allow_other_data_option
@friendly_errors
def evaluate(run, data_dir, device, backend, as_json, plot, tta, members, allow_other_data):
    """Accuracy, per-class accuracy and confusion matrix of a trained model on its test set."""
    run_dir = checkpoint_path(run).parent
    if plot:
        plots.require_matplotlib(run_dir / "confusion.png", run_dir / "worst.png")
    checkpoint = load_checkpoint(run)
    others = [load_checkpoint(member) for member in members]
    chosen = get_backend(backend, device)
    config = checkpoint_config(checkpoint)
    require_rebuildable_run(config, run)
    data_dir = data_dir or recorded_data_dir(checkpoint, run_dir, TEST_FILES)
    dataset = load_dataset(config.dataset, data_dir, test_only=True)
    for each in (checkpoint, *others):  # one line and exit status 1, as train --resume refuses other data
        check_same_task(each, checkpoint)
        check_same_data(each, dataset, allow_other_data, TEST_FILES)
    model, norm = model_from_checkpoint(checkpoint, chosen)
    with chosen.activate():
        split = DeviceSplit.from_host(chosen, dataset.test_images, dataset.test_labels, norm)
        result = evaluate_model(model, split, chosen)
        if not math.isfinite(result.loss):
            raise NonFiniteOutputs(str(checkpoint.path))
        probabilities = predict_probabilities(model, split.images) if plot or others else None
        views = test_time_views(flip=config.flip)
        augmented = evaluate_tta(model, split, chosen, views, fill=norm.background) if tta else None
        if others:  # this model's probabilities are in hand: the others' join them
            trained = [model_from_checkpoint(other, chosen) for other in others]
            ensembled = evaluate_ensemble(trained, dataset.test_images, dataset.test_labels, chosen, [probabilities])
    labels = dataset.test_labels.astype(np.int64)
    report = evaluation_report(checkpoint, config.dataset, labels, result)
    if augmented is not None:
        loss = augmented.loss if math.isfinite(augmented.loss) else None
        report["tta"] = {"views": len(views), "loss": loss, "accuracy": augmented.accuracy}
    if others:
        loss = ensembled.loss if math.isfinite(ensembled.loss) else None
        runs = [str(other.path) for other in (checkpoint, *others)]
        report["ensemble"] = {"checkpoints": runs, "loss": loss, "accuracy": ensembled.accuracy}
    if plot:
        title = f"{config.model} on the {config.dataset} test set"
        confusion, classes = np.asarray(report["confusion_matrix"]), report["classes"]
        report["plots"] = [
            str(plots.plot_confusion(confusion, classes, run_dir / "confusion.png", title=title)),
            str(
                plots.plot_worst(
                    dataset.test_images, labels, result.predictions, probabilities, classes, run_dir / "worst.png"
                )
            ),
        ]
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
        return
    click.echo("\n".join(evaluation_lines(report, RunState(**checkpoint.meta["state"]).position())))


@main.command()
@click.argument("run", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))  # each file's error is its own
@device_options
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="How many classes to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def predict(run, images, device, backend, top_k, as_json):
    """Class and probability for digit pictures (PNG, JPEG...) or .npy arrays.

    A file that cannot be read is reported on its own line and the others are
    still predicted; the exit status is 1 if any failed.
    """
    checkpoint = load_checkpoint(run)
    framing = picture_framing(checkpoint)
    rows, loaded = [], []  # loaded: (row index, image (28, 28)) of every file that could be read
    for path in images:
        try:
            loaded.append((len(rows), load_image(path, framing)))
            rows.append({"image": path})
        except ImageError as exc:
            debug_traceback()  # the file's own error, reported with the others below
            rows.append({"image": path, "error": str(exc)})
    probabilities = []
    if loaded:
        chosen = get_backend(backend, device)
        model, norm = model_from_checkpoint(checkpoint, chosen)
        with chosen.activate():
            batch = normalize_images(chosen, np.stack([image for _, image in loaded])[:, None], norm)
            probabilities = predict_probabilities(model, batch)
    labels = checkpoint.meta["classes"]
    for (index, _), p in zip(loaded, probabilities, strict=True):
        ranked = [int(i) for i in np.argsort(-p, kind="stable")[:top_k]]
        top = [{"class": i, "label": labels[i], "probability": float(p[i])} for i in ranked]
        rows[index].update(top[0], top=top)
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
    else:
        for row in rows:
            if "error" in row:
                click.echo(f"Error: {printable(row['error'])}", err=True)  # a name's newline forges no line
            else:
                shown = ", ".join(f"{printable(t['label'])} ({t['probability']:.1%})" for t in row["top"])
                click.echo(f"{printable(row['image'])}: {shown}")
    if len(loaded) < len(rows):
        sys.exit(1)


@main.command()
@click.argument("run", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True))
@click.option("--format", "format_", type=click.Choice(exporting.FORMATS), required=True, help="What to write.")
@click.option("--output", type=NonEmptyPath(dir_okay=False), required=True, help="The file to write.")
@click.option("--softmax", is_flag=True, help="ONNX only: output class probabilities instead of logits.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@friendly_errors
def export(run, format_, output, softmax, force):
    """Export a trained model: ONNX with the input normalisation built in, or safetensors weights for PyTorch.

    \b
    onnx:        input "images" (N, 1, 28, 28) float32 in [0, 1], output "logits" (N, classes)
                 ("probabilities" with --softmax)
    safetensors: the weights under PyTorch's key names, the input mean and std in its metadata
    """
    if softmax and format_ != "onnx":
        raise click.UsageError("--softmax applies to --format onnx only (safetensors holds weights)")
    output, checkpoint = Path(output), load_checkpoint(run)
    if output.exists() and os.path.samefile(output, checkpoint.path):
        raise click.UsageError(f"{printable(output)} is the checkpoint being exported: pick another --output")
    check_not_a_run_file(output)
    if output.exists() and not force:
        raise click.UsageError(f"{printable(output)} exists: pass --force to replace it")
    if not output.parent.is_dir():
        raise click.UsageError(f"{printable(output.parent)} is not a directory: create it first")
    check_writable(output)
    exporting.require(format_)
    model, norm = model_from_checkpoint(checkpoint, get_backend("numpy", "cpu"))
    metadata = {"model": checkpoint_config(checkpoint).model, "classes": json.dumps(checkpoint.meta["classes"])}
    exporting.export(model, norm, format_, output, softmax=softmax, metadata=metadata, replace=force)
    if format_ == "onnx":
        result = "probabilities" if softmax else "logits"
        shape = f"images (N, 1, 28, 28) in [0, 1] -> {result} (N, {len(checkpoint.meta['classes'])})"
    else:
        shape = f"PyTorch key names; normalise inputs with mean {norm.mean:.6g}, std {norm.std:.6g}"
    click.echo(f"wrote {printable(output)} ({format_}: {shape})")


@main.command()
@click.argument("run", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every network).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on (0: a free one)."
)
@device_options
@click.option("--quiet", is_flag=True, help="No access log (one line per request on stderr).")
@click.option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests for this host name (repeatable; .example.com: it and its subdomains), e.g. behind "
    "a proxy that forwards under its own name. On loopback, only IP addresses, localhost and --host are answered.",
)
@friendly_errors
def serve(run, host, port, device, backend, quiet, allowed_hosts):
    """A local web page to draw digits on and see the model's probabilities, with POST /predict (a PNG in, JSON out).

    Stop it with Ctrl-C.
    """
    from .serve import make_server

    checkpoint = load_checkpoint(run)
    server = make_server(checkpoint, get_backend(backend, device), host, port, quiet, allowed_hosts=allowed_hosts)
    try:  # a stop as soon as the address is out (a supervisor that waited for it) is a stop, exit 0
        announce(f"serving {printable(checkpoint_path(run))} at {server.url} (Ctrl-C stops)")  # now, also into a pipe
        server.serve_forever()
    except KeyboardInterrupt:
        tell("stopped")  # where the console is still there to read it
    finally:
        server.server_close()


@main.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(list(MODELS)),
    help=f"Repeatable [default: {', '.join(BENCH_MODELS)}].",
)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(BACKEND_NAMES),
    help="Repeatable [default: numpy, and cupy where a GPU works].",
)
@click.option("--threads", type=click.IntRange(1, 1024), default=2, show_default=True, help="CPU threads per case.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Steps per timed run.")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Timed runs per case (median reported), interleaved with its PyTorch twin's.",
)
@click.option("--train-batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--infer-batch", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@click.option(
    "--output",
    "output_path",
    type=NonEmptyPath(dir_okay=False),
    metavar="FILE",
    help="Also write the results here as JSON.",
)
@click.option("--tf32", is_flag=True, help=TF32_HELP)
@click.option("--eager", is_flag=True, help="JAX: time the steps run eagerly instead of compiled.")
@click.option(
    "--full-run",
    "full_run_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Also train convnet for one epoch on the MNIST files here and report its peak memory and time.",
)
@friendly_errors
def bench(
    models,
    backends,
    threads,
    steps,
    repeats,
    train_batch,
    infer_batch,
    no_torch,
    as_json,
    output_path,
    tf32,
    eager,
    full_run_dir,
):
    """Training and inference images/s and peak memory, beside PyTorch eager with timed runs interleaved."""
    from ..base.files import write_json
    from .bench import cases, formatting, sessions

    if output_path:
        check_not_a_run_file(Path(output_path))
        check_writable(output_path)  # before the benchmark, not after it
    models = list(dict.fromkeys(models)) or list(BENCH_MODELS)  # each case once, however often it is named
    backends = list(dict.fromkeys(backends)) or (["numpy", "cupy"] if cuda_problem() is None else ["numpy"])
    with_torch = not no_torch and sessions.torch_available()
    settings = cases.Settings(train_batch, infer_batch, steps, repeats, 3, threads, tf32, eager)
    machine = sessions.machine_description(threads)
    tell(f"{machine['processor']}, {machine['cpu_count']} CPUs ({threads} threads), GPUs: {machine['gpus'] or 'none'}")
    results = []
    for case in sessions.xpcnn_cases(backends, models):
        for row in sessions.run_pair(case, settings, with_torch):
            results.append(row)
            tell(f"  {formatting.format_progress(row)}")  # progress: lost on a full disk, not the figures
    lines = [formatting.format_table(results)]  # printed last: --output is written first, whatever stdout is
    report = {"machine": machine, "settings": dataclasses.asdict(settings), "results": results}
    if with_torch:
        spread = formatting.RATIO_SPREAD
        lines.append(f"vs torch: xpcnn / PyTorch eager, median ({spread}) of {repeats} interleaved runs")
        report["ratio_spread"] = formatting.RATIO_SPREAD
    if full_run_dir:
        device = "cuda" if "cupy" in backends else "cpu"
        tell(f"  running one epoch of convnet on {device} ...")
        run = sessions.full_run(full_run_dir, "convnet", device, threads, tf32)
        report["full_run"] = run
        if "error" in run:
            click.echo(f"full MNIST epoch failed: {run['error']}", err=as_json)
        else:
            lines.append(
                f"full MNIST epoch of convnet on {device}: {run['seconds']:.1f} s training "
                f"({run['images_per_second']:,.0f} img/s), {run['wall_seconds']:.1f} s wall, "
                f"test accuracy {run['test_accuracy']:.2%}, peak RSS {run['peak_rss_mib']:,.0f} MiB"
            )
    if output_path:
        write_json(output_path, report)
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(lines))  # with --json, stdout holds it only
    failed = [row for row in results if "error" in row] + ([run] if full_run_dir and "error" in run else [])
    if failed:
        sys.exit(1)  # each failure was reported on its line; the figures that could be measured are kept


@main.command()
@friendly_errors
def info():
    """Backends available here, their versions, the GPUs visible, and where data is found."""
    click.echo(f"xpcnn {__version__}, Python {platform.python_version()} on {platform.platform()}")
    click.echo("\nbackends:")
    for row in available_backends():
        click.echo(f"  {row['backend']:<17} {row['version']:<10} {row['status']}")
    gpus = gpu_names()
    click.echo("\nGPUs: " + (", ".join(gpus) if gpus else "none visible"))
    click.echo(f"auto device picks: {get_backend('auto')}")
    click.echo("\ndatasets:")
    for name in sorted(DATASETS):
        found, cache = find_data_dir(get_spec(name)), cache_dir(name)
        missing = "not found locally " + (
            "(downloaded on first use)" if cache else "(and no home folder to download into)"
        )
        click.echo(f"  {name:<14} {printable(found) if found else missing}")
