"""The benchmark's rows: per-pair ratios of xpcnn to its torch twin, a progress line per case, the table."""

from __future__ import annotations

import statistics

from .cases import PHASES, Case

RATIO_SPREAD = "min and max of the per-pair ratios"


def pair_ratios(xpcnn_runs: list[float], torch_runs: list[float]) -> list[float]:
    """xpcnn / torch for each pair of interleaved timed runs."""
    return [mine / theirs for mine, theirs in zip(xpcnn_runs, torch_runs, strict=True)]


def add_ratios(row: dict, twin: dict) -> None:
    """Set the xpcnn ``row``'s per-pair ratios against its ``twin``, their median and spread (min, max)."""
    for phase in PHASES:
        ratios = pair_ratios(row[f"{phase}_runs"], twin[f"{phase}_runs"])
        row[f"{phase}_ratios"] = ratios
        row[f"{phase}_ratio"] = statistics.median(ratios)
        row[f"{phase}_ratio_min"], row[f"{phase}_ratio_max"] = min(ratios), max(ratios)


def add_epoch_ratios(row: dict) -> None:
    """A compiled row's epoch-program rate (median) and its ratio to the step programs' in the same timed run."""
    epoch_runs = row["train_epoch_runs"]
    row["train_epoch_images_per_second"] = statistics.median(epoch_runs)
    ratios = pair_ratios(epoch_runs, row["train_runs"])
    row["epoch_vs_step_ratios"] = ratios
    row["epoch_vs_step"], row["epoch_vs_step_min"], row["epoch_vs_step_max"] = (
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def _ratio(row: dict, phase: str) -> str:
    """``median (min-max)`` of a row's per-pair ratios for ``phase``, or "" where it has none."""
    if f"{phase}_ratio" not in row:
        return ""
    return f"{row[f'{phase}_ratio']:.2f} ({row[f'{phase}_ratio_min']:.2f}-{row[f'{phase}_ratio_max']:.2f})"


def format_progress(result: dict) -> str:
    """One line for a finished case, printed as the benchmark goes (a run cut short keeps them)."""
    label = Case(result["framework"], result["backend"], result["model"]).label
    if "paired_with" in result:
        label += f" (beside {result['paired_with']})"
    if "error" in result:
        return f"{label}: failed: {result['error']}"
    line = (
        f"{label} on {result['device']}: train {result['train_images_per_second']:,.0f} img/s, "
        f"infer {result['infer_images_per_second']:,.0f} img/s"
    )
    if "train_ratio" in result:
        line += f"; vs torch: train {_ratio(result, 'train')}, infer {_ratio(result, 'infer')}"
    if "train_epoch_images_per_second" in result:
        line += (
            f"; epoch program: train {result['train_epoch_images_per_second']:,.0f} img/s, vs the step programs "
            f"{result['epoch_vs_step']:.2f} ({result['epoch_vs_step_min']:.2f}-{result['epoch_vs_step_max']:.2f})"
        )
        if "train_epoch_ratio" in result:
            line += f", vs torch {_ratio(result, 'train_epoch')}"
    return line


def format_table(results: list[dict]) -> str:
    """A plain-text table of the results: medians, and xpcnn / torch as the median (min-max) of per-pair ratios."""
    width = max([10, *(len(r["model"]) for r in results)])  # resnet-small and the like keep the columns
    header = f"{'model':<{width}} {'framework':<9} {'backend':<17} {'device':<7} {'compiled':<8} "
    header += f"{'train img/s':>12} {'vs torch':>16} "
    header += f"{'infer img/s':>12} {'vs torch':>16} {'peak RSS MiB':>13} {'device MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<{width}} {r['framework']:<9} {r['backend']:<17} failed: {r['error']}")
            continue
        device = f"{r['device_peak_mib']:.0f}" if r.get("device_peak_mib") is not None else "-"
        compiled = "yes" if r.get("compiled") else "no"
        lines.append(
            f"{r['model']:<{width}} {r['framework']:<9} {r['backend']:<17} {r['device']:<7} "
            f"{compiled:<8} {r['train_images_per_second']:>12,.0f} {_ratio(r, 'train'):>16} "
            f"{r['infer_images_per_second']:>12,.0f} {_ratio(r, 'infer'):>16} "
            f"{r['peak_rss_mib']:>13,.0f} {device:>11}"
        )
    return "\n".join(lines)
