"""Which project files one GRPO training step runs code from: the rollout, the reward and metrics
callbacks, the loss and the optimizer step of ``experiment=grpo_toy`` on the tiny model, traced with
``sys.setprofile`` from the start of the second batch to the start of the third.

    python benchmarks/trace_grpo_step.py            # files and functions, one per line
    python benchmarks/trace_grpo_step.py --summary  # the counts only
    python benchmarks/trace_grpo_step.py --edges    # and which file calls which

The count is a measure of the layout (docs/architecture.md): how many files a reader opens to follow a
step from the batch to the loss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import selfbudget_pl
from selfbudget_pl.train import CONFIG_DIR, train

PACKAGE_DIR = Path(selfbudget_pl.__file__).resolve().parent


class StepTracer(L.Callback):
    """Profiles every Python call between two batch starts; keeps the calls into the package."""

    def __init__(self, traced_batch: int = 1) -> None:
        self.traced_batch = traced_batch
        self.calls: dict[str, set[str]] = defaultdict(set)
        self.edges: set[tuple[str, str]] = set()  # (calling file, called file), both in the package

    def _profile(self, frame, event, arg) -> None:  # noqa: ANN001 (sys.setprofile's signature)
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE_DIR):
                name = str(path.relative_to(PACKAGE_DIR))
                self.calls[name].add(frame.f_code.co_qualname)
                caller = Path(frame.f_back.f_code.co_filename) if frame.f_back is not None else None
                if caller is not None and caller.is_relative_to(PACKAGE_DIR) and caller != path:
                    self.edges.add((str(caller.relative_to(PACKAGE_DIR)), name))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.traced_batch:
            sys.setprofile(self._profile)
        elif batch_idx == self.traced_batch + 1:
            sys.setprofile(None)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        sys.setprofile(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="print the counts only")
    parser.add_argument("--edges", action="store_true", help="also print which file calls which")
    args = parser.parse_args()
    tracer = StepTracer()
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=grpo_toy", "model=tiny", "model.name_or_path=null",
                                          "trainer.max_steps=3", "trainer.val_check_interval=null",
                                          "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                                          "data.batch_size=4", "module.num_generations=4",
                                          "module.sampling.max_new_tokens=32", f"paths.output_dir={out}",
                                          f"module.export_dir={out}/export", "logger=tensorboard"])
        with open_dict(cfg):
            cfg.callbacks.step_tracer = {"_target_": "__main__.current_tracer"}  # train() instantiates callbacks
        global _TRACER
        _TRACER = tracer
        train(cfg)
    files = sorted(tracer.calls)
    if not args.summary:
        for name in files:
            print(f"{name}: {', '.join(sorted(tracer.calls[name]))}")
    if args.edges:
        for caller, callee in sorted(tracer.edges):
            print(f"{caller} -> {callee}")
    print(f"{len(files)} project files, {sum(len(v) for v in tracer.calls.values())} functions in one GRPO step")


_TRACER: StepTracer | None = None


def current_tracer() -> StepTracer:
    """The tracer ``main`` made, for Hydra to hand to the Trainer."""
    assert _TRACER is not None
    return _TRACER


if __name__ == "__main__":
    main()
