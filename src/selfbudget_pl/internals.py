"""The one place the package reaches into other libraries' private APIs (torch, Lightning, transformers).

Each accessor below names what it reaches into, why no public API does the job (the figure or the bug it
avoids), and the library versions it was checked on: :data:`KNOWN_VERSIONS`. Everything else in the package
calls these functions and never touches a leading-underscore name of another library, so a library release
that moves one breaks here, in one small function, and ``tests/test_internals.py`` says which.

``tests/test_internals.py`` fails (it does not skip) when an installed library's version is outside
:data:`KNOWN_VERSIONS`, naming the accessors to re-check and the tests that check them; it also runs every
accessor on the real object (FSDP1 and FSDP2 units on two gloo ranks, a Lightning Trainer, a TensorBoard
writer). At run time the accessors behave as before on any version: where a fallback existed (FSDP1's
``_reshard`` missing) it still applies; a private name a release has moved never stops the package from
importing, and the accessor that needs it raises an AttributeError naming itself, the installed library
version and the versions it was checked on.

:mod:`selfbudget_pl.rollout.fused_decode` is the other piece that follows a library's internals (it
re-implements the Qwen2/Llama/Qwen3 forward with public tensors only); it is pinned by the same table:
on a transformers version outside it, ``decoder=auto`` samples with ``model.generate`` instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from typing import Any, Callable, Optional, TypeVar

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch.distributed.fsdp import FullyShardedDataParallel


def _private(module: str, name: str) -> Any:
    """``module.name``, or None where a release has moved it: importing this module (and so the package)
    never fails on a moved private name; the accessor that needs it fails when called, saying which."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _require(value: Any, where: str) -> Any:
    if value is None:
        raise AttributeError(f"{where} is no longer importable")
    return value


_convert_params = _private("lightning.fabric.utilities.logger", "_convert_params")
_flatten_dict = _private("lightning.fabric.utilities.logger", "_flatten_dict")
_apply_activation_checkpointing = _private(
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "apply_activation_checkpointing"
)
_FlatParameter = _private("torch.distributed.fsdp._flat_param", "FlatParameter")
_reshard = _private("torch.distributed.fsdp._runtime_utils", "_reshard")

# The versions every accessor (and the fused decoder) was checked on: torch 2.13.0+cpu and lightning 2.6.6 in
# both environments, transformers 5.25.0 (the main lock), 5.19.0 (the vLLM lock) and each of 5.16.1, 5.17.0,
# 5.18.0, 5.20.2, 5.21.1, 5.22.2, 5.23.0 and 5.24.0 put in its place for tests/test_fused_decode.py,
# test_packing.py, test_rollout_hf.py and test_internals.py; not the patch releases in between. pyproject.toml
# states the same ranges (tests/test_lock.py). Widen an entry, and pyproject's with it, only after
# tests/test_internals.py and the tests it names pass on the new version (scripts/refresh_lock.sh runs them).
KNOWN_VERSIONS: dict[str, str] = {
    "torch": "==2.13.0",
    "lightning": "==2.6.6",
    "transformers": ">=5.16.1,<=5.25.0",
}

# library -> [(what reaches into it, the test files that check it)]; filled by @_reaches_into below.
PINNED: dict[str, list[tuple[str, tuple[str, ...]]]] = {library: [] for library in KNOWN_VERSIONS}
PINNED["transformers"].append(
    ("selfbudget_pl.rollout.fused_decode (Qwen2/Llama/Qwen3 forward re-implemented)", ("tests/test_fused_decode.py",))
)

_F = TypeVar("_F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


class InternalsChanged(AttributeError):
    """A library no longer has the private attribute an accessor reads (an AttributeError, as before)."""


def _reaches_into(library: str, *tests: str) -> Callable[[_F], _F]:
    """Register the decorated accessor under ``library`` (checked by ``tests``); an AttributeError inside
    it is re-raised naming the accessor, the installed version and the versions it was checked on."""

    def register(accessor: _F) -> _F:
        PINNED[library].append((accessor.__name__, ("tests/test_internals.py", *tests)))

        @functools.wraps(accessor)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                return accessor(*args, **kwargs)
            except InternalsChanged:
                raise
            except AttributeError as error:
                raise InternalsChanged(
                    f"selfbudget_pl.internals.{accessor.__name__}: {error} ({library} "
                    f"{installed_version(library)}; checked on {library}{KNOWN_VERSIONS[library]}; "
                    f"bash scripts/refresh_lock.sh re-locks after a re-check)"
                ) from error

        return checked  # type: ignore[return-value]

    return register


# -- versions ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def installed_version(library: str) -> Optional[str]:
    """The installed distribution's version, or None when it is not installed (read once per process:
    the fused decoder asks on every batch)."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_known_version(library: str, version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed one) of ``library`` is in :data:`KNOWN_VERSIONS`."""
    version = version if version is not None else installed_version(library)
    if version is None:
        return False
    return Version(version) in SpecifierSet(KNOWN_VERSIONS[library])


def unknown_version_message(library: str, version: str) -> str:
    """One sentence for ``library`` ``version`` outside :data:`KNOWN_VERSIONS`: the tested range, what to
    re-check before widening it, and how to get the tested versions back."""
    accessors = [name for name, _ in PINNED[library]]
    tests = sorted({test for _, files in PINNED[library] for test in files})
    return (
        f"{library} {version} is not a version selfbudget_pl was tested on ({library}{KNOWN_VERSIONS[library]}, "
        f"as in pyproject.toml): install the locked versions (pip install --no-deps -r requirements/main.txt), "
        f"or re-check {', '.join(accessors)} (src/selfbudget_pl/internals.py) with {', '.join(tests)}, widen "
        f"KNOWN_VERSIONS and pyproject.toml, and re-lock with bash scripts/refresh_lock.sh."
    )


def warn_unknown_versions() -> None:
    """Log each :func:`unknown_versions` message once (at import): a run on untested versions says so before
    it trains, not only when an accessor breaks."""
    for message in unknown_versions():
        log.warning(message)


def unknown_versions() -> list[str]:
    """One :func:`unknown_version_message` per installed library outside :data:`KNOWN_VERSIONS`."""
    return [
        unknown_version_message(library, str(installed_version(library)))
        for library in KNOWN_VERSIONS
        if not is_known_version(library)
    ]


# -- torch: nn.Module ----------------------------------------------------------------------------------------

# Wrapper modules whose attribute name is not part of the checkpoint's names: FSDP1's wrapper, torch's
# activation-checkpoint wrapper, and torch.compile's OptimizedModule.
TRANSPARENT_CHILDREN = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
PINNED["torch"].append(("TRANSPARENT_CHILDREN", ("tests/test_internals.py", "tests/test_distributed.py")))


@_reaches_into("torch", "tests/test_distributed.py")
def child_modules(module: torch.nn.Module) -> dict[str, Optional[torch.nn.Module]]:
    """``module._modules``: every child under its own name, None entries and shared children included.
    ``named_children()`` drops both; the weight walk (:mod:`selfbudget_pl.weights`) must see each name a
    state dict has, and :func:`selfbudget_pl.rollout.fsdp_units.units_above` the wrapper names. Checked on torch 2.13."""
    return module._modules


@_reaches_into("torch", "tests/test_distributed.py")
def own_state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s own state-dict entries (not its children's): parameters, then persistent buffers, as
    ``Module._save_to_state_dict`` reads them from ``_parameters``, ``_buffers`` and
    ``_non_persistent_buffers_set``. No public API lists one module's persistent buffers without its
    children's, and the weight walk gathers FSDP units one at a time, so it cannot ask for the whole state
    dict. Checked on torch 2.13."""
    parameters = [(name, value) for name, value in module._parameters.items() if value is not None]
    buffers = [
        (name, value) for name, value in module._buffers.items()
        if value is not None and name not in module._non_persistent_buffers_set
    ]  # fmt: skip
    return parameters + buffers


@_reaches_into("torch", "tests/test_distributed.py")
def apply_activation_checkpointing(model: torch.nn.Module, check_fn: Callable[[torch.nn.Module], bool]) -> None:
    """torch's ``apply_activation_checkpointing`` (module ``torch.distributed.algorithms._checkpoint``):
    wraps every submodule ``check_fn`` accepts in a checkpoint wrapper, in place, as Lightning's FSDP1
    strategy does; the FSDP2 plan (:class:`selfbudget_pl.strategies.FullyShardPlan`) needs the same wrappers
    before ``fully_shard``. Checked on torch 2.13."""
    apply = _require(_apply_activation_checkpointing, "torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    apply(model, check_fn=check_fn)


# -- torch: FSDP1 and FSDP2 ----------------------------------------------------------------------------------


@_reaches_into("torch", "tests/test_distributed.py")
def is_flat_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is FSDP1's ``FlatParameter`` (``torch.distributed.fsdp._flat_param``): a unit's
    parameters flattened into one, which no checkpoint names (the walk reads the original parameters
    instead). Checked on torch 2.13."""
    return isinstance(tensor, _require(_FlatParameter, "torch.distributed.fsdp._flat_param.FlatParameter"))


@_reaches_into("torch", "tests/test_distributed.py")
def fsdp1_wrapped_module(unit: FullyShardedDataParallel) -> torch.nn.Module:
    """The module whose forward an FSDP1 unit calls (``unit._fsdp_wrapped_module``; the public
    ``unit.module`` skips an activation-checkpoint wrapper in between). Sampling redirects that forward so
    that ``generate`` runs inside the unit's forward (:func:`selfbudget_pl.rollout.fsdp_units.through_forward`),
    and the weight walk steps through it without adding its name. Checked on torch 2.13."""
    return unit._fsdp_wrapped_module


@_reaches_into("torch", "tests/test_distributed.py")
def fsdp_training_state(unit: torch.nn.Module) -> Optional[str]:
    """The name of an FSDP unit's training state (``IDLE``, ``FORWARD``, ``PRE_BACKWARD``, ...): FSDP1's
    ``training_state``, FSDP2's ``unit._get_fsdp_state()._training_state``; None if it has none. Only outside
    a forward may the weight walk reshard a unit, and only then must sampling run the unit's forward (inside
    it, the parameters are gathered already). Checked on torch 2.13."""
    state = unit if isinstance(unit, FullyShardedDataParallel) else unit._get_fsdp_state()
    training_state = getattr(state, "training_state", None) or getattr(state, "_training_state", None)
    return None if training_state is None else training_state.name


@_reaches_into("torch", "tests/test_distributed.py")
def fsdp1_reshard(unit: FullyShardedDataParallel) -> bool:
    """Free an FSDP1 unit's gathered parameters (``_runtime_utils._reshard(unit, unit._handle,
    free_unsharded_flat_param=True)``), as its post-backward would; FSDP1 has no public ``reshard()``
    (FSDP2's is public). A root keeps its parameters gathered after a forward with no backward (sampling):
    left so, every rank holds the whole root unit until the next backward: for R1-Distill-Qwen-1.5B its
    embeddings and lm_head, 151,936 x 1,536 each, are 0.93 GB per rank in bfloat16 (by arithmetic). Returns whether it resharded: not for NO_SHARD (the full
    parameter is the only copy), nor when torch has moved ``_reshard`` (memory only). Checked on torch 2.13
    (tests/fsdp_rollout_run.py ``root_resharded``)."""
    handle = getattr(unit, "_handle", None)
    if handle is None or not handle.uses_sharded_strategy or _reshard is None:
        return False
    _reshard(unit, handle, free_unsharded_flat_param=True)
    return True


# -- torch: TensorBoard writer -------------------------------------------------------------------------------


@_reaches_into("torch", "tests/test_tensorboard.py")
def tensorboard_file_writer(experiment: Any) -> Any:
    """A ``SummaryWriter``'s ``FileWriter`` (``experiment._get_file_writer()``): the HParams plugin's
    summaries go there directly, because ``SummaryWriter.add_hparams`` writes them into a second event file
    (and adds a scalar per metric) and Lightning's ``log_hyperparams(params, metrics)`` adds a scalar point
    at step 0. Checked on torch 2.13."""
    return experiment._get_file_writer()


# -- Lightning -----------------------------------------------------------------------------------------------


@_reaches_into("lightning", "tests/test_distributed.py")
def fsdp_activation_checkpointing(strategy: Any) -> bool:
    """Whether Lightning's FSDP1 strategy will wrap layers in activation-checkpoint wrappers
    (``strategy._activation_checkpointing_kwargs``; False for any other strategy). It does so after
    ``configure_model``, and a KV cache built in forward breaks their recompute, so the policy must turn the
    cache off first. Checked on lightning 2.6."""
    return bool(getattr(strategy, "_activation_checkpointing_kwargs", None))


@_reaches_into("lightning", "tests/test_tensorboard.py")
def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's step-level logs (``trainer._logger_connector.
    should_update_logs``: every ``log_every_n_steps`` batches). Histograms logged beside the scalars must
    use the same cadence. Checked on lightning 2.6."""
    return bool(trainer._logger_connector.should_update_logs)


@_reaches_into("lightning", "tests/test_tensorboard.py")
def logging_step(trainer: Any) -> int:
    """The x-axis value Lightning gives this batch's scalars (``fit_loop.epoch_loop._batches_that_stepped``;
    not ``global_step``, which counts optimizer steps). Checked on lightning 2.6."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


@_reaches_into("lightning", "tests/test_tensorboard.py")
def tensorboard_hparams(logger: Any) -> dict[str, Any]:
    """``logger.hparams`` flattened (nested keys joined with "/") and sanitised exactly as Lightning's
    TensorBoardLogger.log_hyperparams does (``_convert_params``, ``_flatten_dict``, ``logger._sanitize_params``),
    so the HParams tab shows the same keys and values as ``hparams.yaml``. Checked on lightning 2.6."""
    flatten = _require(_flatten_dict, "lightning.fabric.utilities.logger._flatten_dict")
    convert = _require(_convert_params, "lightning.fabric.utilities.logger._convert_params")
    return logger._sanitize_params(flatten(convert(dict(logger.hparams))))


# -- transformers --------------------------------------------------------------------------------------------


@_reaches_into("transformers", "tests/test_distributed.py")
def no_split_modules(model: torch.nn.Module) -> list[str]:
    """The decoder-layer class names a transformers model declares as FSDP units (``_no_split_modules``,
    what accelerate's auto-wrap also reads); [] if it declares none. Checked on transformers 5.16.1-5.25.0."""
    return list(getattr(model, "_no_split_modules", None) or [])


@_reaches_into("transformers", "tests/test_packing.py")
def attention_implementation(config: Any) -> Optional[str]:
    """The attention function a transformers config selects (``config._attn_implementation``). Checked on
    transformers 5.16.1-5.25.0."""
    return config._attn_implementation


@_reaches_into("transformers", "tests/test_packing.py")
def set_attention_implementation(config: Any, name: str) -> None:
    """Select the registered attention function ``name`` on a loaded model's config
    (``config._attn_implementation = name``). ``PreTrainedModel.set_attn_implementation`` is public but
    needs the model, not the config, and re-validates the name against the hub kernels. Checked on
    transformers 5.16.1-5.25.0."""
    config._attn_implementation = name


warn_unknown_versions()  # here, after every accessor has registered itself in PINNED
