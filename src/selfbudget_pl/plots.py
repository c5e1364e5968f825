"""Figures and histograms for TensorBoard and reports (matplotlib, headless)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib
import torch

matplotlib.use("Agg")  # headless: training nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def budget_vs_length_figure(points: Sequence[tuple[float, float, bool]], title: str = "budget vs length"):
    """Scatter of (budget, actual solution length), correct answers in blue, wrong in red, with y = x."""
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for correct, colour, label in ((True, "tab:blue", "correct"), (False, "tab:red", "wrong")):
        chosen = [(b, n) for b, n, c in points if c is correct]
        if chosen:
            axes.scatter(*zip(*chosen), s=10, alpha=0.6, c=colour, label=label)
    top = max(max(b, n) for b, n, _ in points) if points else 1.0
    axes.plot([0, top], [0, top], "k--", linewidth=0.8, label="length = budget")
    axes.set_xlabel("predicted budget (tokens)")
    axes.set_ylabel("actual solution length (tokens)")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def difficulty_figure(
    series: Mapping[str, Sequence[tuple[object, float, bool]]], title: str = "length and accuracy by difficulty"
):
    """Mean length and accuracy per difficulty level, one line per series (e.g. per pre-filled budget).

    Each point is ``(difficulty, length, correct)``; points without a difficulty (None) are left out.
    Numeric difficulties are placed at their value, anything else at evenly spaced categories.
    """
    figure, (length_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 4))
    levels = sorted({d for points in series.values() for d, _, _ in points if d is not None}, key=str)
    numeric = all(isinstance(d, (int, float)) for d in levels)
    if numeric:
        levels.sort()
    position = {level: (float(level) if numeric else index) for index, level in enumerate(levels)}
    for label, points in series.items():
        by_level: dict[object, list[tuple[float, bool]]] = {}
        for difficulty, length, correct in points:
            if difficulty is not None:
                by_level.setdefault(difficulty, []).append((length, correct))
        present = [level for level in levels if level in by_level]
        if not present:
            continue
        xs = [position[level] for level in present]
        lengths = [sum(n for n, _ in by_level[level]) / len(by_level[level]) for level in present]
        accuracy = [sum(c for _, c in by_level[level]) / len(by_level[level]) for level in present]
        length_axes.plot(xs, lengths, marker="o", label=label)
        accuracy_axes.plot(xs, accuracy, marker="o", label=label)
    for axes, ylabel in ((length_axes, "mean length (tokens)"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("difficulty")
        axes.set_ylabel(ylabel)
        if not numeric:
            axes.set_xticks(range(len(levels)), [str(level) for level in levels])
        if axes.has_data():
            axes.legend(fontsize=8)
    accuracy_axes.set_ylim(-0.02, 1.02)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def log_histograms(experiment: Any, prefix: str, lengths: Sequence[float], errors: Sequence[float], step: int) -> None:
    """``<prefix>/completion_length`` and ``<prefix>/budget_error`` histograms (when there are values)."""
    if not hasattr(experiment, "add_histogram"):
        return
    for name, values in (("completion_length", lengths), ("budget_error", errors)):
        if values:
            experiment.add_histogram(f"{prefix}/{name}", torch.tensor(values, dtype=torch.float32), global_step=step)
