"""Progress in batch logs: plain lines when stdout is no terminal, stage banners with an ETA, and no
ModelCheckpoint warning per GRPO save."""

from __future__ import annotations

import re
import warnings

import pytest
from omegaconf import open_dict

from selfbudget_pl.callbacks.progress import ProgressLines, format_duration
from selfbudget_pl.pipeline_progress import pipeline_eta, stage_banner
from selfbudget_pl.train import train

from .test_train import compose_small


def _grpo_cfg(tmp_path, *overrides: str):
    cfg = compose_small("grpo_toy", tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
                        "trainer.limit_val_batches=1", "callbacks.progress_lines.every_n_steps=2",
                        "callbacks.model_checkpoint.every_n_train_steps=2", *overrides)  # fmt: skip
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = True  # the bar the lines replace
    return cfg


def test_grpo_run_prints_progress_lines_and_no_checkpoint_warning(tmp_path, tiny_cache, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(_grpo_cfg(tmp_path))
    out = capsys.readouterr().out  # pytest captures stdout: not a terminal
    lines = [line for line in out.splitlines() if line.startswith("[")]
    train_lines = [line for line in lines if line.startswith("[train] step ")]
    # First step, every 2nd step; the last step (4) is one of them.
    assert [re.match(r"\[train\] step (\d+)/4", line).group(1) for line in train_lines] == ["1", "2", "4"]
    for line in train_lines:
        for field in ("loss ", "reward ", "mean len ", "budget err ", "tok/s ", "s/step", "elapsed ", "ETA "):
            assert field in line, (field, line)
    assert re.search(r"ETA 0:00\b", train_lines[-1])  # nothing left after the last step
    (val_line,) = [line for line in lines if line.startswith("[val]")]
    # The random tiny model states no budget of its own: budget fields are NaN there and left out.
    assert val_line.startswith("[val] step 4 | accuracy ") and "| mean len " in val_line and "nan" not in val_line
    assert "\r" not in out  # no live bar in the log
    assert objects["trainer"].progress_bar_callback.is_disabled
    assert not [w for w in caught if "ModelCheckpoint with manual optimization" in str(w.message)]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # the checkpoints are still written


def test_terminal_keeps_the_bar_and_prints_no_lines(tmp_path, tiny_cache, capsys, monkeypatch):
    cfg = _grpo_cfg(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    monkeypatch.setattr("selfbudget_pl.callbacks.progress.stdout_is_terminal", lambda stream=None: True)
    _, objects = train(cfg)
    assert "[train] step" not in capsys.readouterr().out
    assert not objects["trainer"].progress_bar_callback.is_disabled


def test_durations_eta_and_banner():
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 + 62, None, float("inf"))] == [
        "0:00", "1:00", "1:01", "1:01:02", "?", "?",
    ]
    reference = {"sft": 200.0, "eval_sft": 10.0, "grpo": 100.0}
    assert pipeline_eta({}, ["sft", "eval_sft", "grpo"], reference) == pytest.approx(310.0)
    # This machine ran SFT twice as slowly as the reference: the rest is expected twice as slow too.
    assert pipeline_eta({"sft": 400.0}, ["eval_sft", "grpo"], reference) == pytest.approx(220.0)
    assert pipeline_eta({"sft": 400.0}, ["control"], reference) is None
    assert stage_banner(2, 5, "evaluate", 227.0, 125.0) == "==== [stage 2/5] evaluate | elapsed 3:47 | ETA 2:05"
    with pytest.raises(ValueError, match="mode="):
        ProgressLines(mode="sometimes")
