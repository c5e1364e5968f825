"""Progress a batch log can show: plain lines instead of a live bar when stdout is not a terminal.

Under SLURM, ``nohup`` or ``| tee``, tqdm's bar either writes nothing readable or one carriage-return
line per refresh. :class:`ProgressLines` prints, every ``every_n_steps`` optimizer steps, one line with the
step, the training scalars that say how it goes (loss, reward, mean completion length, budget error),
tokens/s and an ETA, plus one line after each validation; and it switches the live bar off. On a
terminal it stays quiet unless ``mode="always"``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, TextIO

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from selfbudget_pl.schema import Schema, check_arguments, spec

MODES = ("auto", "always", "never")

# (label, logged names in order of preference, format). The first name present in the trainer's
# callback_metrics is shown; a field with none present is left out (SFT has no reward).
TRAIN_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("loss", ("train/loss",), "{:.4f}"),
    ("reward", ("rewards/mean",), "{:+.3f}"),
    ("mean len", ("completions/mean_length",), "{:.1f}"),
    ("budget err", ("rollout/budget/budget_rel_error",), "{:.1%}"),
    ("understated", ("rollout/budget/understated_rate",), "{:.1%}"),  # the collapse detector
    ("tok/s", ("train/tokens_per_s",), "{:.0f}"),
)
VAL_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("accuracy", ("val/accuracy",), "{:.1%}"),
    ("loss", ("val/loss",), "{:.4f}"),
    ("mean len", ("val/budget/mean_length",), "{:.1f}"),
    ("budget err", ("val/budget/budget_rel_error",), "{:.1%}"),
    ("within ±10%", ("val/budget/within_10",), "{:.1%}"),
)


def format_duration(seconds: Optional[float]) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def metric_fields(metrics: Mapping[str, Any], fields: Sequence[tuple[str, tuple[str, ...], str]]) -> list[str]:
    """``label value`` for every field with a finite logged value."""
    parts = []
    for label, names, fmt in fields:
        for name in names:
            if name in metrics:
                value = float(metrics[name])
                if math.isfinite(value):
                    parts.append(f"{label} {fmt.format(value)}")
                break
    return parts


def stdout_is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


@dataclass
class ProgressLinesSchema(Schema):
    """The arguments of :class:`ProgressLines` (``callbacks.progress``) and what each allows."""

    TARGETS = ("selfbudget_pl.callbacks.progress.ProgressLines",)

    every_n_steps: int = spec(ge=1)
    mode: str = spec(choices=MODES)
    disable_bar: bool = spec()


class ProgressLines(pl.Callback):
    """Plain progress lines for logs (see module doc).

    Args:
        every_n_steps: optimizer steps between lines (the first and last step always print).
        mode: ``auto`` (lines when stdout is not a terminal), ``always`` or ``never``.
        disable_bar: with lines on, switch the trainer's live progress bar off.
    """

    def __init__(self, every_n_steps: int = 10, mode: str = "auto", disable_bar: bool = True) -> None:
        check_arguments(ProgressLinesSchema, locals(), "ProgressLines")
        self.every_n_steps = every_n_steps
        self.mode = mode
        self.disable_bar = disable_bar
        self.enabled = False
        self._started = 0.0
        self._start_step = 0
        self._last_printed = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.enabled = self.mode == "always" or (self.mode == "auto" and not stdout_is_terminal())
        if self.enabled and self.disable_bar and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._start_step = trainer.global_step  # a resumed run's ETA counts only steps it has run
        total = _total_steps(trainer)
        self._print(f"[train] starting at step {trainer.global_step}" + (f" of {total}" if total else ""))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        total = _total_steps(trainer)
        last = total is not None and step >= total
        if step == self._last_printed or not (step % self.every_n_steps == 0 or step == self._start_step + 1 or last):
            return
        self._last_printed = step
        self._print(self.train_line(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        parts = metric_fields(trainer.callback_metrics, VAL_FIELDS)
        self._print(" | ".join([f"[val] step {trainer.global_step}", *parts]))

    def train_line(self, trainer: pl.Trainer) -> str:
        step = trainer.global_step
        total = _total_steps(trainer)
        elapsed = time.perf_counter() - self._started
        done = step - self._start_step
        per_step = elapsed / done if done > 0 else None
        where = f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"
        parts = [f"[train] {where}", *metric_fields(trainer.callback_metrics, TRAIN_FIELDS)]
        if per_step is not None:
            parts.append(f"{per_step:.2f} s/step")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if total and per_step is not None:
            parts.append(f"ETA {format_duration(per_step * max(total - step, 0))}")
        return " | ".join(parts)

    @rank_zero_only
    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)


def _total_steps(trainer: pl.Trainer) -> Optional[int]:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # an iterable of unknown length
        return None
    return int(total) if math.isfinite(total) else None
