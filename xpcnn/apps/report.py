"""The text ``xpcnn evaluate`` prints: its JSON report laid out for a terminal."""

from __future__ import annotations


def _figures(entry: dict) -> str:
    loss = float("nan") if entry["loss"] is None else entry["loss"]  # the JSON report holds None for NaN
    return f"accuracy {entry['accuracy']:.2%}  loss {loss:.4f}"


def evaluation_lines(report: dict, position: str) -> list[str]:
    """The lines of ``report`` (as ``evaluate --json`` prints it) for a checkpoint at ``position`` ("after epoch 3")."""
    lines = [f"plots: {', '.join(report['plots'])}"] if "plots" in report else []
    lines.append(
        f"{report['checkpoint']} ({position}) on the {report['dataset']} test set, {report['images']:,} images"
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
        lines.append(f"  {name:>12}  {report['per_class_accuracy'][name]:7.2%}  ({sum(row)} images)")
    lines.append("\nconfusion matrix (rows: true class, columns: predicted):")
    width = max(5, len(str(max(max(row) for row in confusion))) + 1)
    lines.append(" " * 5 + "".join(f"{j:>{width}}" for j in range(len(classes))))
    lines.extend(f"{i:>4} " + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(confusion))
    return lines
