"""Figures for TensorBoard and reports (matplotlib, headless)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

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
