"""PNG pictures of a run: training curves, confusion matrix, most confident mistakes.

matplotlib is an optional extra (``pip install "xpcnn[plot]"``), imported only when a
picture is drawn.  Figures are drawn on matplotlib's Agg canvas without pyplot, so a
backend the caller chose is left alone.  Each picture is rendered to memory first and
then written atomically: a failed render leaves the target path untouched.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..base.errors import XpcnnError
from ..base.files import atomic_output, check_writable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
PLOT_HINT = 'plotting needs matplotlib: pip install "xpcnn[plot]"'
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
MIN_WORST_WIDTH = 4.0  # inches of the worst-images figure however few there are: its title stays whole
TITLE_CHAR_WIDTH = 0.1  # inches a character of a figure title takes, at most: where a long title wraps
MARKER_MAX_EPOCHS = 40  # draw a marker at every epoch up to this many epochs


class PlotError(XpcnnError, RuntimeError):
    """Plotting is unavailable because matplotlib is not installed."""


def require_matplotlib(*outputs: str | os.PathLike) -> None:
    """Raise now (before a long run) if plots cannot be drawn here (PlotError), or written to ``outputs``: a
    folder in a picture's place, a read-only directory.  A directory that does not exist yet (a new run's) is
    made before they are written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(PLOT_HINT) from None
    for output in outputs:
        if Path(output).parent.is_dir():
            check_writable(output)


def _figure(width: float, height: float) -> Figure:
    """A constrained-layout figure of ``width`` x ``height`` inches on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(PLOT_HINT) from None
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Render ``figure`` as PNG in memory, then write it to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    with atomic_output(path) as out:
        out.write(buffer.getvalue())
    return Path(path)


def plot_history(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss and accuracy per epoch of a run's ``history.json`` records, as a PNG at ``path``.

    Each record has ``epoch``, ``train_loss`` and ``train_accuracy``, and optionally
    ``val_*`` / ``test_*`` losses and accuracies; a split is drawn when any record has it.
    Loss goes on a log scale when it spans more than a decade.
    """
    if not history:
        raise ValueError("cannot plot an empty history")
    figure = _figure(10.0, 4.0)
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    epochs = np.array([record["epoch"] for record in history], dtype=np.float64)
    marker = "o" if len(history) <= MARKER_MAX_EPOCHS else None
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    losses = []
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for split, colour in SPLIT_COLOURS.items():
            key = f"{split}_{metric}"
            if any(record.get(key) is not None for record in history):
                values = [math.nan if record.get(key) is None else record[key] for record in history]
                axes.plot(epochs, values, marker=marker, markersize=4, color=colour, label=split)
                if metric == "loss":
                    losses += values
        axes.set_xlabel("epoch")
        axes.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(True, alpha=0.3)
        axes.legend()
    losses = np.array(losses, dtype=np.float64)
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if losses.size and losses.max() > 10 * losses.min():
        loss_axes.set_yscale("log")
    loss_axes.set_ylabel("loss")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))

    title = f"{len(history)} epoch{'s' if len(history) != 1 else ''}"
    tested = [record for record in history if record.get("test_accuracy") is not None]
    if tested:
        best = max(tested, key=lambda record: record["test_accuracy"])
        title += f", best test accuracy {best['test_accuracy']:.2%} at epoch {best['epoch']}"
    figure.suptitle(title)
    return _save(figure, path)


def _one_two_five(top: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``top``: readable ticks for a log colour scale of counts."""
    ticks, decade = [], 1
    while decade <= top:
        ticks += [step * decade for step in (1, 2, 5) if step * decade <= top]
        decade *= 10
    return ticks


def _literal(names: list[str]) -> list[str]:
    """Class names as matplotlib shows them literally: a checkpoint's "$x$" would be parsed as mathematics,
    and malformed mathematics fails the whole figure; a lone surrogate, which no font renders and matplotlib
    refuses, as its escape."""
    escaped = (name.encode("utf-8", "backslashreplace").decode("utf-8") for name in names)
    return [name.replace("$", r"\$") for name in escaped]


def plot_confusion(
    confusion: np.ndarray, classes: list[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """A (K, K) confusion matrix of counts (rows: true class, columns: predicted) as a PNG at ``path``.

    The diagonal is blue by per-class accuracy (shown under each count); errors are red on
    a log scale of counts, so that a handful of mistakes beside ~1000 correct images still
    shows.  ``title`` replaces the heading "confusion matrix"; overall accuracy follows it.
    """
    matrix = np.asarray(confusion)
    classes, k = _literal(classes), len(classes)
    if matrix.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {matrix.shape} does not match {k} classes")
    total = int(matrix.sum())
    if total <= 0:
        raise ValueError("confusion matrix holds no images")
    side = min(max(4.0, 0.55 * k + 2.0), 14.0)
    figure = _figure(side + 1.3, side)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, LogNorm

    correct = np.diagonal(matrix).astype(np.int64)
    rows = matrix.sum(axis=1)
    recall = np.divide(correct, rows, out=np.zeros(k), where=rows > 0)
    errors = matrix.astype(np.int64)
    np.fill_diagonal(errors, 0)
    # Leave out the palest ends of the colour maps so that every coloured cell stands out from white.
    error_map = ListedColormap(colormaps["Reds"](np.linspace(0.25, 1.0, 256)))
    correct_map = ListedColormap(colormaps["Blues"](np.linspace(0.3, 1.0, 256)))
    error_norm = LogNorm(vmin=1, vmax=max(int(errors.max()), 2))
    colours = np.ones((k, k, 4))
    wrong = errors > 0
    colours[wrong] = error_map(error_norm(errors[wrong]))
    colours[np.arange(k), np.arange(k)] = correct_map(recall)
    empty = np.flatnonzero(rows == 0)
    colours[empty, empty] = (0.9, 0.9, 0.9, 1.0)  # a class with no images: no accuracy to colour

    axes = figure.subplots()
    axes.imshow(colours, interpolation="nearest")
    luminance = colours[..., :3] @ np.array([0.299, 0.587, 0.114])
    font_size = max(4.0, min(9.0, 80.0 / k))
    for i in range(k):
        for j in range(k):
            text = str(int(matrix[i, j]))
            if i == j and k <= 15:
                text += f"\n{recall[i]:.1%}" if rows[i] else "\nno images"
            colour = "white" if luminance[i, j] < 0.5 else ("0.75" if matrix[i, j] == 0 else "black")
            axes.text(j, i, text, ha="center", va="center", color=colour, fontsize=font_size)
    long_names = max(len(name) for name in classes) > 2
    axes.set_xticks(range(k), classes, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    axes.set_yticks(range(k), classes)
    axes.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="white", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    axes.spines[:].set_visible(False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if errors.any():
        ticks = _one_two_five(int(errors.max()))
        bar = figure.colorbar(ScalarMappable(norm=error_norm, cmap=error_map), ax=axes, shrink=0.8)
        bar.set_ticks(ticks, labels=[str(tick) for tick in ticks])
        bar.minorticks_off()
        bar.set_label("misclassified images (log scale)")
    wrong_total = total - int(correct.sum())
    figure.suptitle(
        f"{title or 'confusion matrix'}\naccuracy {correct.sum() / total:.2%}: "
        f"{wrong_total:,} of {total:,} images misclassified"
    )
    return _save(figure, path)


def worst_indices(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` misclassified images, most confident mistake first.

    ``labels`` and ``predictions`` are (N,) class indices, ``probabilities`` (N, K); a
    mistake's confidence is the probability given to its (wrong) predicted class.  Ties
    keep index order.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    wrong = np.flatnonzero(labels != predictions)
    confidence = np.asarray(probabilities)[wrong, predictions[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def plot_worst(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    path: str | os.PathLike,
    count: int = 36,
) -> Path:
    """A grid of the ``count`` most confidently misclassified images as a PNG at ``path``.

    ``images`` is (N, H, W), uint8 (0..255) or float (shown from its minimum to maximum);
    ``labels`` and ``predictions`` (N,) class indices; ``probabilities`` (N, K) with
    K = len(classes).  Each image is captioned "true X / pred Y (p%)".
    """
    images, classes = np.asarray(images), _literal(classes)
    n = images.shape[0]
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    if np.shape(labels) != (n,) or np.shape(predictions) != (n,) or np.shape(probabilities) != (n, len(classes)):
        raise ValueError(
            f"labels {np.shape(labels)}, predictions {np.shape(predictions)} and probabilities "
            f"{np.shape(probabilities)} do not match {n} images and {len(classes)} classes"
        )
    chosen = worst_indices(labels, predictions, probabilities, count)
    wrong_total = int(np.count_nonzero(np.asarray(labels) != np.asarray(predictions)))
    if not chosen.size:
        figure = _figure(4.0, 1.2)
        figure.text(0.5, 0.5, f"no misclassified images\n(of {n:,})", ha="center", va="center", fontsize=12)
        return _save(figure, path)

    shown = f"all {wrong_total:,}"
    if chosen.size < wrong_total:
        shown = f"the {chosen.size} most confident of {wrong_total:,}"
    title = f"{shown} misclassified images ({wrong_total / n:.2%} of {n:,}), most confident first"
    columns = min(chosen.size, max(6, math.ceil(math.sqrt(chosen.size))))
    rows = math.ceil(chosen.size / columns)
    width = max(1.4 * columns, MIN_WORST_WIDTH)
    lines = textwrap.wrap(title, max(1, int(width / TITLE_CHAR_WIDTH)))  # a few mistakes: a narrow figure
    figure = _figure(width, 1.55 * rows + 0.25 + 0.25 * len(lines))
    if images.dtype == np.uint8:
        low, high = 0, 255
    else:
        low, high = float(images[chosen].min()), float(images[chosen].max())
    for panel, index in enumerate(chosen):
        axes = figure.add_subplot(rows, columns, panel + 1)
        axes.imshow(images[index], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        true, predicted = classes[int(labels[index])], classes[int(predictions[index])]
        confidence = float(probabilities[index][int(predictions[index])])
        caption = f"true {true} / pred {predicted} ({confidence:.1%})"
        if len(caption) > 24:
            caption = caption.replace(" / ", "\n", 1)
        axes.set_title(caption, fontsize=7.5)
    figure.suptitle("\n".join(lines))
    return _save(figure, path)
