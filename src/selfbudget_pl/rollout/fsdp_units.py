"""Sampling on a policy sharded by FSDP from inside the forward of the FSDP units above it.

The HF backend samples with the inner policy, whose ``generate`` never runs the forward of the FSDP unit
that holds it (the root wrapping the LightningModule): that unit's own parameters (embeddings, final norm,
lm_head) would be read as shards. :func:`units_above` finds those units; :func:`through_forward` runs the
sampling inside their forwards, as Lightning runs ``training_step`` inside the root's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from selfbudget_pl import internals


def units_above(root: torch.nn.Module, prefix: str, policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units from ``root`` down to ``policy`` (at attribute path ``prefix``) whose forward
    ``policy.generate`` does not run, outermost first: every FSDP1 wrapper on the way (``generate`` on a
    wrapper goes to the wrapped module), and FSDP2 ``fully_shard`` modules above the policy (the policy's
    own forward runs, with its hooks, in every step)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    names = [name for name in prefix.split(".") if name]
    module, units = root, []
    while True:
        if isinstance(module, FullyShardedDataParallel) or (isinstance(module, FSDPModule) and module is not policy):
            units.append(module)
        if module is policy:
            return units
        children = internals.child_modules(module)
        wrapped = next((children[name] for name in internals.TRANSPARENT_CHILDREN if name in children), None)
        if wrapped is not None:
            module = wrapped
        elif names and isinstance(children.get(names[0]), torch.nn.Module):
            module = children[names.pop(0)]
        else:
            raise ValueError(
                f"sync_weights: the module at {prefix!r} of {type(root).__name__} is not the model this "
                "backend samples with"
            )


def through_forward(units: list[torch.nn.Module], sample: Callable[[], Any]) -> Any:
    """``sample()`` run inside the forward of every unit in ``units`` (outermost first), as Lightning runs
    ``training_step`` inside the root's forward: the unit's pre-forward gathers its own parameters, in the
    compute dtype of its mixed-precision policy, and nested units gather theirs in their own forwards, one
    layer at a time, during each decoding step.

    Why not ``summon_full_params(root, recurse=False)``: it gathers in full precision, so under mixed
    precision (``strategy.mixed_precision.param_dtype=bfloat16``) float32 embeddings feed bfloat16 layers
    and sampling fails ("mat1 and mat2 must have the same dtype"), and it gathers twice the bytes. Holding
    the unit's parameters for the whole call rather than per step costs nothing at peak (every step needs
    them) and gathers once; afterwards they are released (:func:`_release`), so between calls only the
    shards stay. A unit already in its forward (Lightning's ``training_step``/``validation_step`` under
    FSDP1 run inside the root's forward) has its parameters gathered: it is left as it is.
    """
    if not units:
        return sample()
    unit, inner_units = units[0], units[1:]
    if _in_forward(unit):
        return through_forward(inner_units, sample)
    from torch.distributed.fsdp import FullyShardedDataParallel

    # The module whose forward the unit calls: the wrapped module (FSDP1), or the unit itself (FSDP2 hooks).
    target = internals.fsdp1_wrapped_module(unit) if isinstance(unit, FullyShardedDataParallel) else unit
    own_forward = target.__dict__.get("forward")
    results = []

    def restore() -> None:
        if own_forward is None:
            target.__dict__.pop("forward", None)
        else:
            target.forward = own_forward

    def redirected(*args: Any, **kwargs: Any) -> None:
        restore()  # forward calls made while sampling reach the real one
        results.append(through_forward(inner_units, sample))

    target.forward = redirected
    try:
        unit()
    finally:
        restore()
    _release(unit)
    return results[0]


def _in_forward(unit: torch.nn.Module) -> bool:
    """Whether an FSDP unit is inside its forward (or backward): its parameters are gathered already."""
    training_state = internals.fsdp_training_state(unit)
    return training_state is not None and training_state != "IDLE"


def _release(unit: torch.nn.Module) -> None:
    """Free a unit's gathered parameters after the sampling forward. A root keeps them after its forward
    (for the backward that follows in training), but sampling has no backward. FSDP2 needs this for more
    than memory: a root left gathered after a no-grad forward took a wrong optimizer step next (seen on
    torch 2.13, tests/fsdp_rollout_run.py ``after_step``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(unit, FullyShardedDataParallel):
        unit.reshard()  # FSDP2: public, not recursive
        return
    internals.fsdp1_reshard(unit)
