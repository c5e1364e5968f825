"""The evaluation's report: the summary tables (the paper's layout, controllability) as markdown, and the
figures per dataset as PNGs and in TensorBoard. Rows come from :func:`selfbudget_pl.evaluate.evaluate_model`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib.pyplot as plt
from torch.utils.tensorboard import SummaryWriter

from selfbudget_pl.metrics import UNDERSTATED_FRACTION
from selfbudget_pl.plots import budget_vs_length_figure, difficulty_figure

Budget = Optional[int]  # None: the model states its own budget; N: <budget>N</budget> is pre-filled

# Summary columns (summary.json keys) in the order of the paper's main table, with their headers.
MAIN_TABLE = (
    ("dataset", "dataset"),
    ("budget", "budget"),
    ("n", "n"),
    ("k", "k"),
    ("accuracy", "accuracy %"),
    ("accuracy_se", "± s.e."),
    ("mean_tokens", "mean tokens"),
    ("compression", "compression %"),
    ("accuracy_change", "Δ accuracy (pts)"),
    ("budget_mae", "budget MAE"),
    ("within_10", "within ±10 %"),
    ("within_20", "within ±20 %"),
    ("spearman_budget_difficulty", "ρ(budget, difficulty)"),
    # the collapse detector: own budgets far below the length written (a gamed reward's signature)
    ("understated_rate", f"budget < {UNDERSTATED_FRACTION:g} × length %"),
)
CONTROL_TABLE = (
    ("dataset", "dataset"),
    ("budget", "requested N"),
    ("n", "n"),
    ("mean_budget_ratio", "mean actual/N"),
    ("within_10", "within ±10 % of N"),
    ("accuracy", "accuracy %"),
)
_PERCENT = {"accuracy", "accuracy_se", "compression", "within_10", "within_20", "understated_rate"}  # shown as 100 * value, one decimal
_FORMATS = {"accuracy_change": "{:+.1f}", "mean_budget_ratio": "{:.2f}", "spearman_budget_difficulty": "{:+.2f}"}


def summary_markdown(
    rows: Sequence[Mapping[str, Any]], baseline_rows: Optional[Mapping[str, Mapping[str, Any]]] = None
) -> str:
    """The main table (one row per dataset and budget), the paper-shaped table and, with pre-filled
    budgets, the controllability table."""
    text = "## Accuracy, length and budget adherence\n\n" + _table(rows, MAIN_TABLE)
    own = [row for row in rows if row["budget"] is None]
    if own:
        text += "\n## As the paper prints it (accuracy % / mean tokens / compression vs the baseline)\n\n"
        text += paper_table(own, baseline_rows)
    prefilled = [row for row in rows if row["budget"] is not None]
    if prefilled:
        text += "\n## Pre-filled budgets (controllability)\n\n" + _table(prefilled, CONTROL_TABLE)
    return text


def paper_table(
    rows: Sequence[Mapping[str, Any]], baseline_rows: Optional[Mapping[str, Mapping[str, Any]]] = None
) -> str:
    """One line per model, datasets as column groups: accuracy (± s.e. for avg@k), mean tokens and
    compression against the baseline (a base-model run), then the mean compression over datasets,
    as in the paper's main table. ``rows``: this run's own-budget rows; ``baseline_rows``: by dataset."""
    names = [row["dataset"] for row in rows]
    header = ["model"]
    for name in names:
        header += [f"{name} acc %", f"{name} tokens", f"{name} compr. %"]
    header.append("mean compr. %")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    models: list[tuple[str, Mapping[str, Mapping[str, Any]]]] = []
    if baseline_rows:
        models.append(("baseline", baseline_rows))
    models.append(("this run", {row["dataset"]: row for row in rows}))
    for label, by_name in models:
        cells, compressions = [label], []
        for name in names:
            row = by_name.get(name, {})
            accuracy = _cell("accuracy", row.get("accuracy"))
            if row.get("accuracy_se") is not None:
                accuracy += f" ± {_cell('accuracy_se', row['accuracy_se'])}"
            compression = row.get("compression") if label == "this run" else None
            if compression is not None:
                compressions.append(compression)
            cells += [accuracy, _cell("mean_tokens", row.get("mean_tokens")), _cell("compression", compression)]
        cells.append(_cell("compression", mean(compressions)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if key == "budget":
        return budget_label(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _PERCENT:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return _FORMATS.get(key, "{:.1f}").format(value)
    return str(value)


def write_figures(
    completions: Mapping[str, Mapping[Budget, list[dict[str, Any]]]],
    out_path: Path,
    rows: Sequence[Mapping[str, Any]],
    markdown: str,
    tensorboard: bool,
) -> None:
    """PNGs per dataset (and the same figures, scalars and table to TensorBoard)."""
    writer = None
    if tensorboard:
        writer = SummaryWriter(str(out_path / "tensorboard"))
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "budget":
                    writer.add_scalar(f"eval/{row['dataset']}/budget_{budget_label(row['budget'])}/{key}", value)
        writer.add_text("eval/summary", markdown)
    for name, by_budget in completions.items():
        every = [c for rows_of_budget in by_budget.values() for c in rows_of_budget]
        points = [(c["budget"], c["length"], c["correct"]) for c in every if c["budget"] is not None]
        figures = {"budget_vs_length": budget_vs_length_figure(points, title=f"{name}: stated budget vs length")}
        if any(c["difficulty"] is not None for c in every):
            series = {
                ("own budget" if budget is None else f"pre-filled {budget}"): [
                    (c["difficulty"], c["response_tokens"], c["correct"]) for c in rows_of_budget
                ]
                for budget, rows_of_budget in by_budget.items()
            }
            figures["by_difficulty"] = difficulty_figure(series, title=f"{name}: tokens and accuracy by difficulty")
        for kind, figure in figures.items():
            figure.savefig(out_path / f"{kind}_{name}.png", dpi=120)
            if writer is not None:
                writer.add_figure(f"eval/{name}/{kind}", figure)  # closes the figure
            else:
                plt.close(figure)
    if writer is not None:
        writer.close()


def budget_label(budget: Budget) -> str:
    """How a budget condition is named in tables and tags: ``model`` for the model's own."""
    return "model" if budget is None else str(budget)


def mean(values: Sequence[float]) -> Optional[float]:
    """The mean, or None for no values."""
    return sum(values) / len(values) if values else None
