"""What ``xpcnn evaluate`` reports (its JSON report, and the same laid out for a terminal), and the notes
``xpcnn train`` gives before it trains."""

from __future__ import annotations

import numpy as np

from ..base.errors import printable
from ..data.checkpoint import Checkpoint
from ..data.device_data import EvalResult
from ..training.config import TrainConfig, model_has_batch_norm, recipe_dataset, recipes_for


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: rows the true class, columns the predicted one."""
    flat = labels.astype(np.int64) * classes + predictions
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Each true class's share predicted right; None for a class with no images (not 0: none was wrong)."""
    return [float(row[k] / row.sum()) if row.sum() else None for k, row in enumerate(np.asarray(confusion))]


def evaluation_report(checkpoint: Checkpoint, dataset: str, labels: np.ndarray, result: EvalResult) -> dict:
    """``evaluate --json``'s report of ``result``, the checkpoint's model on ``dataset``'s test ``labels`` (N,)."""
    classes = checkpoint.meta["classes"]
    confusion = confusion_matrix(labels, result.predictions, len(classes))
    per_class = per_class_accuracy(confusion)
    return {
        "checkpoint": str(checkpoint.path),
        "dataset": dataset,
        "epoch": checkpoint.meta["state"]["epoch"],  # completed; a checkpoint written by a stop is "step" further
        "step": checkpoint.meta["state"]["step"],
        "images": int(len(labels)),
        "loss": result.loss,
        "accuracy": result.accuracy,
        "per_class_accuracy": dict(zip(classes, per_class, strict=False)),  # None where a class has no images
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
    }


def _figures(entry: dict) -> str:
    loss = float("nan") if entry["loss"] is None else entry["loss"]  # the JSON report holds None for NaN
    return f"accuracy {entry['accuracy']:.2%}  loss {loss:.4f}"


def _images(count: int) -> str:
    return f"{count:,} image" + ("" if count == 1 else "s")


def evaluation_lines(report: dict, position: str) -> list[str]:
    """The lines of ``report`` (as ``evaluate --json`` prints it) for a checkpoint at ``position`` ("after epoch 3")."""
    # Names, of files and of a checkpoint's classes, are printed with their control characters escaped: they
    # forge no line, and drive no terminal.
    lines = [f"plots: {printable(', '.join(report['plots']))}"] if "plots" in report else []
    lines.append(
        f"{printable(report['checkpoint'])} ({position}) on the {report['dataset']} test set, "
        f"{_images(report['images'])}"
    )
    lines.append(_figures(report))
    if "tta" in report:
        lines.append(f"with test-time augmentation ({report['tta']['views']} views): {_figures(report['tta'])}")
    if "ensemble" in report:
        members = len(report["ensemble"]["checkpoints"])
        lines.append(f"ensemble of {members} models (softmax averaged): {_figures(report['ensemble'])}")
    confusion, classes = report["confusion_matrix"], report["classes"]
    lines.append("\nper-class accuracy:")
    for name, row in zip(classes, confusion, strict=True):
        accuracy = report["per_class_accuracy"][name]
        shown = "n/a" if accuracy is None else format(accuracy, ".2%")
        lines.append(f"  {printable(name):>12}  {shown:>7}  ({_images(sum(row))})")
    lines.append("\nconfusion matrix (rows: true class, columns: predicted):")
    width = max(5, len(str(max(max(row) for row in confusion))) + 1)
    lines.append(" " * 5 + "".join(f"{j:>{width}}" for j in range(len(classes))))
    lines.extend(f"{i:>4} " + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(confusion))
    return lines


def train_notes(config: TrainConfig, recipe: str | None, resumed: TrainConfig | None, missing: str | None, chosen):
    """What ``xpcnn train`` notes on stderr before training ``config`` with backend ``chosen``: a recipe made for
    another dataset, or a recipe's setting the model has no layer for; ``resumed`` (the run's recorded settings,
    when resuming) stretched to more epochs on a schedule that depends on its length; ``missing``, the backend the
    run or the recipe wanted, not usable here."""
    notes = []
    own = recipes_for(config.dataset)
    if recipe and recipe not in own:
        others = f" (for {config.dataset}: --recipe {'|'.join(own)})" if own else ""
        notes.append(f"the {recipe} recipe was chosen on {recipe_dataset(recipe)}, not {config.dataset}{others}")
    if recipe and config.recalibrate_bn and not model_has_batch_norm(config.model):  # left out, not refused
        notes.append(f"the {recipe} recipe's batch-norm recalibration is left out: {config.model} has no batch norm")
    if resumed is not None and resumed.epochs != config.epochs and config.schedule != "constant":
        notes.append(
            f"the {config.schedule} schedule was planned over {resumed.epochs} epoch(s) and now spans {config.epochs}: "
            f"the learning rate goes on from where the longer schedule stands, so the run will not match one "
            f"started with --epochs {config.epochs} (only a constant schedule continues exactly)"
        )
    if missing and resumed is not None:
        notes.append(f"the run trained on {missing}, which cannot run here: it continues on {chosen}")
    elif missing:
        notes.append(
            f"the {recipe} recipe's seconds were measured on {missing}, which is not installed: "
            f"this trains on {chosen.name}, about twice as long (pip install {missing})"
        )
    return notes
