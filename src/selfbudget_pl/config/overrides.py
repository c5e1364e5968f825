"""Command-line overrides as users type them: any Lightning ``Trainer`` argument under ``trainer.``.

Hydra refuses ``trainer.fast_dev_run=true`` when the trainer group does not list ``fast_dev_run``
(its composed config is closed; only ``+trainer.fast_dev_run=true`` adds a key). The trainer group is
Lightning's, so every argument of ``lightning.pytorch.Trainer`` may be given as typed: such overrides
become Hydra's add-or-override (``++``). A key that is no Trainer argument is an error naming it, with
the closest argument.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Sequence

from selfbudget_pl.schema import ConfigError

_TRAINER_OVERRIDE = re.compile(r"^trainer\.(\w+)=")


def trainer_arguments() -> frozenset[str]:
    """Names of ``lightning.pytorch.Trainer``'s constructor arguments."""
    from lightning.pytorch import Trainer

    return frozenset(name for name in inspect.signature(Trainer.__init__).parameters if name != "self")


def open_trainer_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with every ``trainer.<Trainer argument>=value`` turned into ``++trainer.<...>=value``;
    raises :class:`ConfigError` for ``trainer.<anything else>=...``."""
    known = trainer_arguments()
    opened = []
    for override in overrides:
        match = _TRAINER_OVERRIDE.match(override)
        if match and match.group(1) not in known:
            close = difflib.get_close_matches(match.group(1), sorted(known), n=1)
            hint = f"; did you mean trainer.{close[0]}?" if close else ""
            raise ConfigError(f"{override}: {match.group(1)!r} is not an argument of lightning.pytorch.Trainer{hint}")
        opened.append(f"++{override}" if match else override)
    return opened
