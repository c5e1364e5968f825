"""``selfbudget-lightning``: a LightningCLI over the same LightningModules and DataModule as ``train.py``.

Hydra stays the main interface and the one source of defaults: the LightningCLI configs
(``configs/lightning/<experiment>.yaml``) are generated from the composed Hydra experiment by
:func:`lightning_config` (every ``_target_`` becomes ``class_path`` + ``init_args``), and a test fails
when a committed file differs from what the Hydra configs give now. Regenerate after changing them::

    python -m selfbudget_pl.lightning_cli export-configs          # writes configs/lightning/*.yaml

Use::

    selfbudget-lightning fit --config configs/lightning/grpo_toy.yaml --trainer.devices=8 --model.num_generations=8
    selfbudget-lightning fit --config configs/lightning/sft_toy.yaml --print_config   # the resolved config

Anything in the file can be overridden with jsonargparse's dotted flags (``--model.init_args.x`` or the
short ``--model.x``, ``--data.batch_size``, ``--trainer.max_steps``); ``--ckpt_path`` resumes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from omegaconf import DictConfig, OmegaConf, open_dict

from selfbudget_pl.callbacks.hparams import RunConfigHParams
from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.modules.base import PolicyModule
from selfbudget_pl.train import CONFIG_DIR

# The Hydra experiments that have a LightningCLI config, and where those configs live.
EXPERIMENTS = ("sft_toy", "grpo_toy")
LIGHTNING_CONFIG_DIR = "lightning"
HEADER = (
    "# Generated from the Hydra config `python train.py experiment={name}` by\n"
    "# `python -m selfbudget_pl.lightning_cli export-configs`; do not edit by hand (tests/test_lightning_cli.py\n"
    "# fails when this file and the Hydra configs drift apart). Run:\n"
    "#   selfbudget-lightning fit --config configs/lightning/{name}.yaml [--trainer.max_steps=... --model.x=...]\n"
)


def to_class_paths(node: Any) -> Any:
    """A resolved Hydra node in jsonargparse's shape: ``{_target_: T, k: v}`` -> ``{class_path: T,
    init_args: {k: v}}``, recursively. ``_partial_`` needs nothing more: jsonargparse builds a callable
    from ``class_path`` for parameters typed as callables returning that class (optimizer, rollout)."""
    if isinstance(node, dict):
        if "_target_" in node:
            args = {key: to_class_paths(value) for key, value in node.items() if not key.startswith("_")}
            return {"class_path": node["_target_"], "init_args": args} if args else {"class_path": node["_target_"]}
        return {key: to_class_paths(value) for key, value in node.items()}
    if isinstance(node, list):
        return [to_class_paths(value) for value in node]
    return node


def lightning_config(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """The LightningCLI ``fit`` config equivalent to a composed ``train.yaml`` config.

    What ``train.train`` wires by hand is written out: the shared output format, grader and rollout go
    to the module, the output format to the DataModule, the reward callback first among the
    callbacks, the loggers into the trainer. ``output_dir`` stands in for Hydra's run directory.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    if cfg.strategy.get("name") != "auto":
        raise ValueError(f"strategy={cfg.strategy.get('name')!r}: give the strategy with --trainer.strategy instead")
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = dict(plain["module"])
    module.update(
        model_loader=plain["model"],
        output_format=plain["output_format"],
        grader=plain["grader"],
        rollout=plain["rollout"],
    )
    data = dict(plain["data"])
    data["output_format"] = plain["output_format"]
    trainer = {key: value for key, value in plain["trainer"].items() if not key.startswith("_")}
    named_callbacks = {"reward": plain.get("reward"), **(plain.get("callbacks") or {})}
    trainer["callbacks"] = [entry for entry in named_callbacks.values() if entry and "_target_" in entry]
    trainer["logger"] = [entry for entry in (plain.get("logger") or {}).values() if entry and "_target_" in entry]
    trainer["strategy"] = "auto"
    data_args = to_class_paths(data)["init_args"]  # the DataModule class is fixed: its arguments only
    config = {
        "seed_everything": plain["seed"],
        "num_threads": plain.get("num_threads"),
        "trainer": to_class_paths(trainer),
        "model": to_class_paths(module),
        "data": data_args,
        "ckpt_path": plain.get("ckpt_path"),
    }
    return config


def compose_experiment(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def config_text(name: str) -> str:
    """The generated LightningCLI config for Hydra experiment ``name``, as the committed file holds it."""
    cfg = compose_experiment(name)
    config = lightning_config(cfg, output_dir=f"{cfg.paths.log_dir}/{cfg.name}/lightning")
    return HEADER.format(name=name) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=110)


def export_configs(config_dir: Optional[Path] = None, names: Iterable[str] = EXPERIMENTS) -> list[Path]:
    out = Path(config_dir or CONFIG_DIR) / LIGHTNING_CONFIG_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out / f"{name}.yaml"
        path.write_text(config_text(name))
        written.append(path)
    return written


class SelfBudgetCLI(LightningCLI):
    """LightningCLI with what ``train.train`` adds around ``Trainer.fit``: torch's thread count, the
    DataModule tokenizing with the module's tokenizer, and the run's config in TensorBoard's HParams tab."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--num_threads", type=Optional[int], default=None, help="torch intra-op threads (CPU)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        threads = config.get("num_threads") if config is not None else None
        if threads:
            torch.set_num_threads(int(threads))

    def _connect(self) -> None:
        self.datamodule.connect(self.model.tokenizer)

    def _run_config(self) -> dict[str, Any]:
        config = (self.config.get(self.subcommand) if self.subcommand else self.config).clone().as_dict()
        # Plain values only (the --config paths are jsonargparse Path objects): what YAML and TensorBoard take.
        return json.loads(json.dumps(config, default=str))

    def before_fit(self) -> None:
        self._connect()
        self.trainer.callbacks.append(RunConfigHParams(self._run_config()))  # the whole config, as with Hydra

    def before_validate(self) -> None:
        self._connect()

    def before_test(self) -> None:
        self._connect()


def cli(args: Optional[Sequence[str]] = None, run: bool = True) -> SelfBudgetCLI:
    return SelfBudgetCLI(
        PolicyModule,
        BudgetMathDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["export-configs"]:
        for path in export_configs():
            print(f"wrote {path}")
        return
    cli(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
