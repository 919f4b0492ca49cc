"""Plots: each function writes a valid, modest PNG; failures leave no file; matplotlib stays optional."""

import sys

import numpy as np
import pytest
from PIL import Image

from xpcnn.apps.plots import PlotError, plot_confusion, plot_history, plot_worst, worst_indices
from xpcnn.base import files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS = [str(d) for d in range(10)]


def needs_matplotlib():
    pytest.importorskip("matplotlib")


def check_png(path, min_side=200, max_side=2000):
    """``path`` holds a PNG that Pillow reads, of a sensible size in pixels and bytes."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) < 400_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_side <= width <= max_side and min_side // 4 <= height <= max_side
    assert not list(path.parent.glob("*.part")), "temporary file left behind"
    return width, height


def history(epochs, val=True):
    records = []
    for epoch in range(1, epochs + 1):
        record = {
            "epoch": epoch,
            "train_loss": 2.0 / epoch**2,
            "train_accuracy": 1 - 0.1 / epoch,
            "test_loss": 0.1 / epoch,
            "test_accuracy": 0.97 + 0.002 * epoch,
            "lr": 0.01,
            "seconds": 12.0,
        }
        if val:
            record["val_loss"] = 0.12 / epoch
            record["val_accuracy"] = 0.968 + 0.002 * epoch
        records.append(record)
    return records


def classifier_output(n=400, k=10, wrong=40, seed=0):
    """Fake test-set results: images, labels, predictions (``wrong`` of them wrong), probabilities."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, k, size=n)
    predictions = labels.copy()
    mistakes = rng.choice(n, size=wrong, replace=False)
    predictions[mistakes] = (labels[mistakes] + rng.integers(1, k, size=wrong)) % k
    probabilities = rng.dirichlet(np.ones(k), size=n)
    probabilities[np.arange(n), predictions] += 1.0  # the predicted class is the most probable
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return images, labels, predictions, probabilities


def test_missing_matplotlib_raises_plot_error(monkeypatch, tmp_path):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotError) as caught:
        plot_history(history(3), tmp_path / "history.png")
    assert str(caught.value) == 'plotting needs matplotlib: pip install "xpcnn[plot]"'
    assert isinstance(caught.value, RuntimeError)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("val", [True, False])
def test_history_multi_epoch(tmp_path, val):
    needs_matplotlib()
    path = tmp_path / "history.png"
    assert plot_history(history(12, val=val), path) == path
    width, height = check_png(path)
    assert width > height


def test_history_single_epoch(tmp_path):
    needs_matplotlib()
    path = tmp_path / "history.png"
    plot_history(history(1), str(path))
    check_png(path)


def test_history_partial_keys_and_empty(tmp_path):
    needs_matplotlib()
    records = history(4, val=False)
    del records[0]["test_loss"], records[0]["test_accuracy"]  # e.g. a split evaluated from epoch 2 on
    plot_history(records, tmp_path / "history.png")
    check_png(tmp_path / "history.png")
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_confusion_10x10(tmp_path):
    needs_matplotlib()
    rng = np.random.default_rng(1)
    confusion = rng.integers(0, 4, size=(10, 10)) * (rng.random((10, 10)) < 0.3)
    np.fill_diagonal(confusion, rng.integers(950, 1130, size=10))
    path = tmp_path / "confusion.png"
    assert plot_confusion(confusion, DIGITS, path, title="mnist lenet") == path
    width, height = check_png(path)
    assert abs(width - height) < width  # roughly square


def test_confusion_perfect_long_names_and_bad_shape(tmp_path):
    needs_matplotlib()
    names = ["T-shirt/top", "Trouser", "Pullover", "Ankle boot"]
    plot_confusion(np.diag([100, 90, 80, 70]), names, tmp_path / "perfect.png")
    check_png(tmp_path / "perfect.png")
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion(np.zeros((3, 3), int), names, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_class_names_are_shown_literally_not_as_mathematics(tmp_path):
    needs_matplotlib()
    names = ["$\\nope$", "$", "a$b$c", "\ud800"]  # malformed mathtext, or a lone surrogate, would fail the figure
    check_png(plot_confusion(np.diag([5, 4, 3, 2]) + 1, names, tmp_path / "confusion.png"))
    images = np.zeros((4, 28, 28), np.uint8)
    probabilities = np.full((4, 4), 0.25)
    check_png(plot_worst(images, np.arange(4), np.array([1, 0, 3, 2]), probabilities, names, tmp_path / "worst.png"))


def test_worst_indices_order_and_count():
    labels = np.array([0, 1, 2, 3, 4, 5])
    predictions = np.array([1, 1, 0, 3, 0, 0])  # wrong at 0, 2, 4, 5
    probabilities = np.full((6, 3), 0.1)
    probabilities[[0, 2, 4, 5], [1, 0, 0, 0]] = [0.6, 0.9, 0.6, 0.8]
    assert worst_indices(labels, predictions, probabilities, 10).tolist() == [2, 5, 0, 4]  # ties keep index order
    assert worst_indices(labels, predictions, probabilities, 2).tolist() == [2, 5]
    assert worst_indices(labels, labels, probabilities, 5).size == 0
    with pytest.raises(ValueError):
        worst_indices(labels, predictions, probabilities, 0)


def panels_drawn(monkeypatch):
    """Record how many image panels plot_worst draws."""
    from matplotlib.figure import Figure

    drawn = []
    original = Figure.add_subplot

    def add_subplot(self, *args, **kwargs):
        drawn.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "add_subplot", add_subplot)
    return drawn


def test_worst_many_errors_limited_by_count(tmp_path, monkeypatch):
    needs_matplotlib()
    drawn = panels_drawn(monkeypatch)
    path = tmp_path / "worst.png"
    assert plot_worst(*classifier_output(wrong=60), DIGITS, path) == path
    assert len(drawn) == 36
    check_png(path)
    drawn.clear()
    plot_worst(*classifier_output(wrong=60), DIGITS, path, count=8)
    assert len(drawn) == 8
    check_png(path)


def test_worst_few_errors_float_images(tmp_path, monkeypatch):
    needs_matplotlib()
    drawn = panels_drawn(monkeypatch)
    images, labels, predictions, probabilities = classifier_output(wrong=5)
    images = (images / 255.0 - 0.13) / 0.31  # normalised float images
    plot_worst(images, labels, predictions, probabilities, DIGITS, tmp_path / "worst.png")
    assert len(drawn) == 5
    check_png(tmp_path / "worst.png")


def test_worst_no_errors(tmp_path):
    needs_matplotlib()
    images, labels, _, probabilities = classifier_output(wrong=0)
    plot_worst(images, labels, labels, probabilities, DIGITS, tmp_path / "worst.png")
    check_png(tmp_path / "worst.png", min_side=100)


def test_worst_bad_shapes(tmp_path):
    needs_matplotlib()
    images, labels, predictions, probabilities = classifier_output()
    with pytest.raises(ValueError, match="do not match"):
        plot_worst(images, labels[:-1], predictions, probabilities, DIGITS, tmp_path / "worst.png")
    with pytest.raises(ValueError, match="do not match"):
        plot_worst(images, labels, predictions, probabilities, DIGITS[:5], tmp_path / "worst.png")
    assert not (tmp_path / "worst.png").exists()


def test_failed_render_leaves_target_untouched(tmp_path, monkeypatch):
    needs_matplotlib()
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    new = tmp_path / "new.png"
    with pytest.raises(RuntimeError, match="render failed"):
        plot_history(history(3), new)
    old = tmp_path / "old.png"
    old.write_bytes(b"previous picture")
    with pytest.raises(RuntimeError, match="render failed"):
        plot_confusion(np.eye(10, dtype=int), DIGITS, old)
    assert not new.exists()
    assert old.read_bytes() == b"previous picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    needs_matplotlib()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)  # fails after the bytes went to the temporary file
    with pytest.raises(OSError, match="disk full"):
        plot_worst(*classifier_output(), DIGITS, tmp_path / "worst.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("wrong", [1, 2, 5, 40])
def test_the_worst_images_title_fits_its_figure_however_few_there_are(tmp_path, monkeypatch, wrong):
    """With one or two mistakes the figure was a column or two wide and its title cut off on both sides."""
    needs_matplotlib()
    from xpcnn.apps import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    n = 60
    labels, predictions = np.zeros(n, int), np.zeros(n, int)
    predictions[:wrong] = 1
    plot_worst(np.zeros((n, 28, 28), np.uint8), labels, predictions, np.full((n, 10), 0.1), list("abcdefghij"), "x")
    (figure,) = figures
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    from matplotlib.text import Text

    title, frame = figure.get_suptitle(), figure.bbox
    (shown,) = [text for text in figure.findobj(Text) if text.get_text() == title]
    extent = shown.get_window_extent(renderer)
    assert "misclassified images" in title
    assert frame.x0 <= extent.x0 and extent.x1 <= frame.x1 and frame.y0 <= extent.y0 and extent.y1 <= frame.y1
