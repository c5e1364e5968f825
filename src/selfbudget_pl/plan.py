"""``selfbudget-plan``: print a run's memory plan without launching it.

    selfbudget-plan experiment=grpo_math model=r1_distill_qwen_7b trainer=fsdp2 strategy=fsdp2 trainer.devices=8
    selfbudget-plan --devices-memory 80 experiment=grpo_math trainer.devices=8

Takes the same Hydra overrides as ``train.py``; plans for the devices the config names (``trainer.devices``,
``trainer.num_nodes``) rather than this machine's, and checks against ``--devices-memory`` GiB per device
(``memory_plan.device_memory_gib``) and ``--host-memory`` GiB per host when given. Exits 1 when the plan
cannot fit, naming the biggest term and the keys that shrink it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from selfbudget_pl.schema import ConfigError
from selfbudget_pl.memory.fit import format_plan, host_memory, misfits, plan_from_config
from selfbudget_pl.train import CONFIG_DIR


def plan_text(overrides: Sequence[str], devices_memory: Optional[float] = None,
              host_memory_gib: Optional[float] = None) -> tuple[str, list[str]]:
    """The plan's table for ``train.yaml`` with ``overrides``, and the budgets it overruns."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    settings = instantiate(cfg.memory_plan)
    if devices_memory is not None:
        settings.device_memory_gib = devices_memory
    if host_memory_gib is not None:
        settings.host_memory_gib = host_memory_gib
    plan, device_memory = plan_from_config(cfg, settings, probe=False)
    host_bytes = host_memory(settings, probe=False)
    return format_plan(plan, device_memory, settings, host_bytes), misfits(plan, device_memory, settings, host_bytes)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="selfbudget-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices-memory", type=float, default=None, help="GiB per device to check against")
    parser.add_argument("--host-memory", type=float, default=None, help="GiB per host to check against")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args(argv)
    try:
        text, problems = plan_text(args.overrides, args.devices_memory, args.host_memory)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    print(text)
    if problems:
        sys.exit("error: memory plan: " + "; ".join(problems))
