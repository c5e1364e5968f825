"""Training state is never lost: N steps, stop, resume for N more == 2N uninterrupted (SFT, CPU)."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfbudget_pl.train import train

from .test_train import compose_small


class StopAtStep(L.Callback):
    """Stops training cleanly after ``step`` optimizer steps, as a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run(output_dir, *overrides, stop_at=None, ckpt_path=None):
    # 16 problems in batches of 4: an epoch is 4 steps, so 3 + 3 stops mid-epoch and resumes across an epoch.
    cfg = compose_small("sft_toy", output_dir, "trainer.max_steps=6", "trainer.val_check_interval=1000",
                        "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=3",
                        "callbacks.model_checkpoint.save_top_k=-1", *overrides)
    with open_dict(cfg):
        cfg.data.train[0].size = 16
        cfg.data.val = []
        cfg.ckpt_path = str(ckpt_path) if ckpt_path else None
        if stop_at:
            cfg.callbacks.stop = {"_target_": f"{__name__}.StopAtStep", "step": stop_at}
    _, objects = train(cfg)
    return objects


def loss_trace(output_dir) -> dict[int, float]:
    trace = {}
    for path in sorted((output_dir / "tensorboard").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        trace.update({event.step: event.value for event in events.Scalars("train/loss")})
    return trace


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, tiny_cache):
    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop_at=3)
    assert interrupted["trainer"].global_step == 3
    checkpoint = tmp_path / "part" / "checkpoints" / "step_step=3.ckpt"
    resumed = run(tmp_path / "resumed", ckpt_path=checkpoint)
    assert resumed["trainer"].global_step == 6

    full_trace, resumed_trace = loss_trace(tmp_path / "full"), loss_trace(tmp_path / "resumed")
    assert sorted(resumed_trace) == [3, 4, 5]  # logged at global steps 3..5 (steps 4..6)
    for step, loss in resumed_trace.items():
        assert abs(loss - full_trace[step]) < 1e-5, (step, loss, full_trace[step])
    full_weights = full["module"].model.state_dict()
    for name, value in resumed["module"].model.state_dict().items():
        assert torch.allclose(value, full_weights[name], atol=1e-6), name


def test_checkpoint_write_is_atomic(tmp_path, tiny_cache, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no partial file behind."""
    objects = run(tmp_path, "trainer.max_steps=3")
    trainer = objects["trainer"]
    target = tmp_path / "checkpoints" / "last.ckpt"
    before = target.read_bytes()

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    try:
        trainer.save_checkpoint(target)
    except OSError:
        pass
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        p.name for p in target.parent.iterdir() if p.suffix == ".ckpt"
    )
