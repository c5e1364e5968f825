"""The policy's full (unsharded) weights, streamed one tensor at a time: the one place that knows how to
read them, whatever holds the model (a plain module, peft LoRA, an FSDP1 wrapper or FSDP2 ``fully_shard``).

Used by the export (:func:`full_state_dict`: raw names, LoRA kept as is) and by
the vLLM weight sync (:class:`selfbudget_pl.rollout.vllm.VLLMRolloutBackend`: the HF checkpoint's names,
LoRA merged in).

Memory stays bounded by one gather unit: an FSDP1 unit is unsharded with ``summon_full_params(recurse=False)``
(its own flat parameter only, nested units one at a time inside it), an FSDP2 parameter with
``DTensor.full_tensor()``. LoRA is merged arithmetically on the gathered tensors (``W + scaling * B @ A``),
never with peft's ``merge_adapter`` on shards, so the training weights are never touched.

Under FSDP every function here is a collective: every rank must iterate to the end, in the same order
(the module tree fixes it), and every rank gets the full tensors.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from selfbudget_pl import internals


def is_sharded(root: torch.nn.Module) -> bool:
    """Whether ``root`` holds FSDP-sharded modules (the FSDP1 wrapper or FSDP2 ``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in root.modules())


def iter_full_weights(
    root: torch.nn.Module, prefix: str = "", merge_lora: bool = True, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every entry of the state dict of ``root``'s submodule at ``prefix``.

    Args:
        root: the module to read: the policy itself, or the (FSDP-sharded) module that holds it.
        prefix: the policy's attribute path in ``root`` (``"model."`` for the LightningModule); names are
            yielded without it, and modules outside it are skipped (never gathered).
        merge_lora: fold active LoRA adapters into their base weights and yield the base model's names
            (``model.layers.0.self_attn.q_proj.weight``, as in the HF checkpoint); False yields the
            peft model's own state-dict names and tensors (adapters separate).
        dtype: yield tensors in this dtype (None: their own). Each rank casts its FSDP2 shard before the
            gather, so a float32 model synced to a bfloat16 engine moves half the bytes; FSDP1 units gather
            their flat parameter as it is, and LoRA layers merge in float32, before the cast.

    A yielded tensor may alias the parameter, or gathered FSDP1 storage that stays valid only while the walk
    is inside that FSDP unit: copy what must outlive it (vLLM's reload holds a tensor until the rest of its
    layer has arrived, which is inside the same decoder-layer unit).
    """
    yield from _walk_root(root, prefix, merge_lora, dtype)


def full_state_dict(root: torch.nn.Module, prefix: str) -> Optional[dict[str, torch.Tensor]]:
    """The unsharded weights of ``root``'s submodule at ``prefix`` (keys without it, as in that
    submodule's ``state_dict()``, LoRA adapters separate), on CPU, when ``root`` is sharded by FSDP
    (wrapper or ``fully_shard``); None when it is not (single device, DDP).

    Collective under FSDP: every rank must call it. The weights are gathered one FSDP unit or parameter at
    a time (:func:`iter_full_weights`, which the vLLM weight sync streams from too)
    and only rank 0 keeps them (the others get an empty dict), so one full copy sits in host memory
    rather than one per rank.
    """
    if not is_sharded(root):
        return None
    keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_full_weights(root, prefix, merge_lora=False):
        if keep:
            state[name] = tensor.to("cpu", copy=True)
    return state


def _walk_root(root: torch.nn.Module, prefix: str, merge_lora: bool, dtype: Optional[torch.dtype] = None) -> Iterator:
    # No torch.no_grad() around the walk: a grad mode set inside a generator would leak into the
    # caller's code between items. Gathers and merges are wrapped individually instead.
    _reshard_idle_units(root)
    for name, tensor in _walk(root, "", prefix, merge_lora, dtype):
        tensor = tensor.detach()
        yield name[len(prefix) :], tensor if dtype is None else tensor.to(dtype)


def _walk(module: torch.nn.Module, path: str, prefix: str, merge_lora: bool, dtype: Optional[torch.dtype]) -> Iterator:
    """Pre-order over ``module`` (at dotted ``path``, wrapper names left out), yielding ``(path + name,
    full tensor)`` for its state dict entries under ``prefix``."""
    if not (path.startswith(prefix) or prefix.startswith(path)):
        return  # outside the policy (e.g. a frozen reference model): never gathered
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        # Only this unit's own flat parameter; nested units are unsharded one at a time as the walk
        # reaches them. writeback=False: nothing here modifies the parameters.
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            yield from _walk(internals.fsdp1_wrapped_module(module), path, prefix, merge_lora, dtype)
        return
    peft = _peft_classes() if merge_lora else None
    if peft is not None:
        if isinstance(module, peft["LoraLayer"]):
            yield from _merged_lora_layer(module, path, peft)
            return
        if isinstance(module, peft["ModulesToSaveWrapper"]):
            # The trained copy stands in for the original under the original's name.
            active = module.active_adapters[0] if module.active_adapters else None
            use_copy = active is not None and not module.disable_adapters and active in module.modules_to_save
            chosen = module.modules_to_save[active] if use_copy else module.original_module
            yield from _walk(chosen, path, prefix, merge_lora, dtype)
            return
    for name, tensor in internals.own_state(module):
        if not internals.is_flat_parameter(tensor) and (path + name).startswith(prefix):
            yield path + name, _full(tensor, dtype)
    for name, child in internals.child_modules(module).items():
        if child is None:
            continue
        transparent = name in internals.TRANSPARENT_CHILDREN or (
            peft is not None
            and ((isinstance(module, peft["PeftModel"]) and name == "base_model")
                 or (isinstance(module, peft["BaseTuner"]) and name == "model"))
        )  # fmt: skip
        yield from _walk(child, path if transparent else f"{path}{name}.", prefix, merge_lora, dtype)


def _reshard_idle_units(root: torch.nn.Module) -> None:
    """Reshard every FSDP2 unit under ``root`` that is not inside a forward or backward. A root unit stays
    gathered after a forward that no backward follows (generation, validation), and its module then holds
    the gathered compute copies (bfloat16 under ``strategy.mixed_precision``), not its float32 parameters:
    read as they are, the export would be rounded. Resharding is local (no collective) and only frees memory;
    the next forward gathers again."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            training_state = internals.fsdp_training_state(module)
            if training_state is None or training_state == "IDLE":
                module.reshard()


def _merged_lora_layer(layer: torch.nn.Module, path: str, peft: dict[str, type]) -> Iterator:
    """``merged_lora_linear`` under the layer's checkpoint names."""
    weight, bias = merged_lora_linear(layer, path.rstrip("."))
    yield path + "weight", weight
    if bias is not None:
        yield path + "bias", bias


def merged_lora_linear(layer: torch.nn.Module, where: str = "") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A peft LoRA Linear's base weight (and bias) with every active, unmerged adapter added:
    ``W + s * B @ A``, computed in float32 and cast back to W's dtype, as ``merge_and_unload`` would
    leave it (sharded tensors are gathered). Raises NotImplementedError for layers it cannot merge;
    ``where`` names the layer in that message."""
    peft = _peft_classes()
    if peft is None or not isinstance(layer, peft["LoraLinear"]):
        raise NotImplementedError(
            f"merging {type(layer).__name__} LoRA layers ({where}) is not supported; target Linear layers "
            "only (model.lora.target_modules)."
        )
    base = layer.get_base_layer()
    unexpected = set(name for name, _ in base.named_parameters()) - {"weight", "bias"}
    if unexpected or list(base.buffers()):
        raise NotImplementedError(f"LoRA base layer {type(base).__name__} at {where} is not a plain Linear")
    weight = _full(base.weight)
    bias = _full(base.bias) if getattr(base, "bias", None) is not None else None
    adapters = [] if layer.disable_adapters else layer.active_adapters
    merged_weight, merged_bias = weight.float(), None if bias is None else bias.float()
    for adapter in adapters:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue  # not a LoRA adapter of this layer, or already folded into W by peft
        if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
            raise NotImplementedError(f"merging LoRA variants (DoRA, ...) is not supported ({where})")
        scaling = layer.scaling[adapter]
        lora_a = _full(layer.lora_A[adapter].weight)
        lora_b = _full(layer.lora_B[adapter].weight)
        with torch.no_grad():
            delta = lora_b.float() @ lora_a.float()
            if layer.fan_in_fan_out:
                delta = delta.T
            merged_weight = merged_weight + delta * scaling
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            with torch.no_grad():
                merged_bias = merged_bias + _full(layer.lora_B[adapter].bias).float() * scaling
    return merged_weight.to(weight.dtype), None if bias is None else merged_bias.to(bias.dtype)


def _full(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The whole tensor: an FSDP2 (or any DTensor) shard is all-gathered (a collective), cast to ``dtype``
    (None: its own) before the gather, so the gather moves ``dtype``'s bytes."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach() if dtype is None else tensor.detach().to(dtype)
    with torch.no_grad():
        return (tensor if dtype is None else tensor.to(dtype)).full_tensor()


_PEFT: Optional[dict[str, type]] = None


def _peft_classes() -> Optional[dict[str, type]]:
    """peft's classes the walk recognises, or None without peft (then nothing is a LoRA model)."""
    global _PEFT
    if _PEFT is None:
        try:
            from peft import PeftModel
            from peft.tuners.lora import Linear as LoraLinear
            from peft.tuners.lora import LoraLayer
            from peft.tuners.tuners_utils import BaseTuner
            from peft.utils import ModulesToSaveWrapper
        except ImportError:
            _PEFT = {}
        else:
            _PEFT = {
                "PeftModel": PeftModel, "BaseTuner": BaseTuner, "LoraLayer": LoraLayer, "LoraLinear": LoraLinear,
                "ModulesToSaveWrapper": ModulesToSaveWrapper,
            }  # fmt: skip
    return _PEFT or None
