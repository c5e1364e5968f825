"""Lightning strategies built from config: ``auto``, ``ddp`` and ``fsdp`` (auto-wrapped on the model's decoder layer).

``configs/strategy/*.yaml`` point at :func:`make_strategy`; ``train()`` passes the model loader, so the
FSDP wrap policy is read off the checkpoint being trained instead of being hard-coded per architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from lightning.pytorch.strategies import Strategy

from selfbudget_pl.models import ModelLoader

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_strategy(
    name: str = "auto", model: Optional[Union[ModelLoader, str]] = None, **kwargs: Any
) -> Union[str, Strategy]:
    """Return a Lightning strategy (or the name Lightning resolves itself) for ``trainer.strategy``.

    Args:
        name: ``auto`` (Lightning picks), ``ddp`` or ``fsdp``.
        model: the model loader (or checkpoint path); only ``fsdp`` reads it, to find the layer to wrap.
        kwargs: options of :func:`ddp_strategy` or :func:`fsdp_strategy`.
    """
    if name == "auto":
        if kwargs:
            raise ValueError(f"strategy 'auto' takes no options, got {sorted(kwargs)}")
        return "auto"
    if name == "ddp":
        return ddp_strategy(**kwargs)
    if name == "fsdp":
        if model is None:
            raise ValueError("strategy 'fsdp' needs the model (train() passes model=<ModelLoader>) to find its layers")
        return fsdp_strategy(model, **kwargs)
    raise ValueError(f"strategy.name={name!r} is not one of: auto, ddp, fsdp")


def ddp_strategy(find_unused_parameters: bool = False, static_graph: bool = False, **kwargs: Any) -> Strategy:
    """DDP; the process-group backend is Lightning's choice (gloo on CPU, nccl on GPU) unless given.

    ``find_unused_parameters`` stays off: every trainable weight takes part in every loss, and the
    search costs a graph traversal per backward.
    """
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=find_unused_parameters, static_graph=static_graph, **kwargs)


def fsdp_strategy(
    model: Union[ModelLoader, str],
    wrap_layers: Optional[list[str]] = None,
    activation_checkpointing: bool = False,
    mixed_precision: Optional[Mapping[str, Optional[str]]] = None,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> Strategy:
    """Lightning FSDP, one FSDP unit per decoder layer of ``model``.

    Args:
        model: the model loader or checkpoint path whose decoder-layer class is wrapped.
        wrap_layers: class names to wrap instead of the model's ``_no_split_modules``.
        activation_checkpointing: recompute each wrapped layer's activations in backward.
        mixed_precision: ``{param_dtype, reduce_dtype, buffer_dtype}`` names; None follows ``trainer.precision``.
        sharding_strategy: FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD.
        state_dict_type: ``sharded`` (each rank writes its shard: fast resume at any scale) or ``full``.
        cpu_offload: keep parameters and gradients on CPU between uses.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layers = decoder_layer_classes(model, wrap_layers)
    precision = None
    if mixed_precision:
        precision = MixedPrecision(**{key: _DTYPES[value] for key, value in mixed_precision.items() if value})
    return FSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy(layers),
        activation_checkpointing_policy=set(layers) if activation_checkpointing else None,
        mixed_precision=precision,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        **kwargs,
    )


def decoder_layer_classes(
    model: Union[ModelLoader, str], names: Optional[list[str]] = None
) -> set[type[torch.nn.Module]]:
    """The module classes FSDP wraps: ``names`` or the model's ``_no_split_modules``, resolved to classes.

    The model is built from its config on the meta device, so this costs no memory and reads no weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model.path if isinstance(model, ModelLoader) else str(model)
    trust_remote_code = model.trust_remote_code if isinstance(model, ModelLoader) else False
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    wanted = set(names or getattr(skeleton, "_no_split_modules", None) or [])
    if not wanted:
        raise ValueError(f"{type(skeleton).__name__} declares no _no_split_modules; set strategy.wrap_layers")
    classes = {type(module) for module in skeleton.modules() if type(module).__name__ in wanted}
    missing = wanted - {cls.__name__ for cls in classes}
    if not classes or (names and missing):
        raise ValueError(f"no modules of class {sorted(missing or wanted)} in {type(skeleton).__name__}")
    return classes
