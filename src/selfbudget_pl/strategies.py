"""Lightning strategies built from config: ``auto``, ``ddp``, ``fsdp`` (FSDP1, auto-wrapped on the model's
decoder layer) and ``fsdp2`` (Lightning's ``ModelParallelStrategy`` with ``fully_shard`` per decoder layer).

``configs/strategy/*.yaml`` point at :func:`make_strategy`; ``train()`` passes the model loader, so the
FSDP wrap policy is read off the checkpoint being trained instead of being hard-coded per architecture.

``fsdp`` (Lightning's ``FSDPStrategy``) runs ``training_step`` inside the root FSDP unit's forward, so a
backward inside ``training_step`` (manual optimization: GRPO) fails there (Lightning issues #19626 and
#19685); :func:`check_strategy_supports` refuses that pairing up front. ``fsdp2`` has no root wrapper: the
sharding is a :class:`FullyShardPlan` that the strategy carries and ``PolicyModule.configure_model``
applies to the policy (the one place that adapts the strategy to the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from selfbudget_pl import internals
from selfbudget_pl.config.groups import StrategySchema
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.schema import check_arguments
from selfbudget_pl.weights import is_sharded

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_strategy(
    name: str = "auto", model: Optional[Union[ModelLoader, str]] = None, **kwargs: Any
) -> Union[str, Strategy]:
    """Return a Lightning strategy (or the name Lightning resolves itself) for ``trainer.strategy``.

    Args:
        name: ``auto`` (Lightning picks), ``ddp``, ``fsdp`` or ``fsdp2``.
        model: the model loader (or checkpoint path); ``fsdp`` and ``fsdp2`` read it, to find the layers to shard.
        kwargs: options of :func:`ddp_strategy`, :func:`fsdp_strategy` or :func:`fsdp2_strategy`.
    """
    check_arguments(StrategySchema, {"name": name, **kwargs}, "make_strategy")
    if name == "auto":
        return "auto"
    if name == "ddp":
        return ddp_strategy(**kwargs)
    if model is None:
        raise ValueError(f"strategy {name!r} needs the model (train() passes model=<ModelLoader>) to find its layers")
    return fsdp_strategy(model, **kwargs) if name == "fsdp" else fsdp2_strategy(model, **kwargs)


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
    load_from_rank_zero: bool = True,
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
        load_from_rank_zero: only rank 0 reads the checkpoint into host memory; the other ranks build the
            model on the meta device (``PolicyModule.load_model``, through :func:`loads_once`) and FSDP fills
            each unit as it wraps it: empty storage on the rank's device (:func:`materialize_empty`), then
            rank 0's parameters and buffers broadcast into it (``sync_module_states``: every buffer of the
            unit, rotary frequencies outside the state dict included), before sharding. GRPO's reference
            model would load the same way (``load_model(frozen=True)``, inside the same wrapped module), but
            GRPO is refused under FSDP1 (:func:`check_strategy_supports`).
        kwargs: passed to Lightning's ``FSDPStrategy`` (and from there to ``FullyShardedDataParallel``).
    """
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layers = decoder_layer_classes(model, wrap_layers)
    precision = None
    if mixed_precision:
        precision = MixedPrecision(**{key: _DTYPES[value] for key, value in mixed_precision.items() if value})
    strategy = FSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy(layers),
        activation_checkpointing_policy=set(layers) if activation_checkpointing else None,
        mixed_precision=precision,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        **kwargs,
    )
    if load_from_rank_zero:
        # Added after construction: the init function needs the strategy, whose device Lightning sets later.
        # Lightning's own class, not a subclass: its GPU-only check matches the type exactly.
        strategy.kwargs.update(
            sync_module_states=True, param_init_fn=lambda module: materialize_empty(module, strategy.root_device)
        )
    return strategy


def materialize_empty(module: torch.nn.Module, device: torch.device) -> None:
    """Give ``module``'s own meta-device parameters and buffers (not its children's) uninitialised storage on
    ``device``, for FSDP's ``sync_module_states`` to overwrite with rank 0's values.

    Parameters are swapped in place rather than replaced (as ``to_empty`` does): a weight two modules share
    (``lm_head`` tied to ``embed_tokens``) stays one parameter, as on rank 0, so FSDP flattens the unit
    alike on every rank."""
    for param in module.parameters(recurse=False):
        if param.is_meta:
            empty = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
            torch.utils.swap_tensors(param, empty)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_meta:
            setattr(module, name, torch.empty_like(buffer, device=device))


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
    wanted = set(names or internals.no_split_modules(skeleton))
    if not wanted:
        raise ValueError(f"{type(skeleton).__name__} declares no _no_split_modules; set strategy.wrap_layers")
    classes = {type(module) for module in skeleton.modules() if type(module).__name__ in wanted}
    missing = wanted - {cls.__name__ for cls in classes}
    if not classes or (names and missing):
        raise ValueError(f"no modules of class {sorted(missing or wanted)} in {type(skeleton).__name__}")
    return classes


# -- FSDP2 ---------------------------------------------------------------------------------------------


@dataclass
class FullyShardPlan:
    """How ``fsdp2`` shards a model: ``fully_shard`` on every module of ``layers`` (each an FSDP unit,
    optionally activation-checkpointed), then on the model itself (the root unit: embeddings, final norm,
    lm_head). Called on the policy (and GRPO's frozen reference model) by ``PolicyModule.configure_model``;
    a model already sharded is returned as it is, so a second ``configure_model`` changes nothing.

    The root is the policy, not the LightningModule: GRPO and SFT call ``self.model(...)``, whose forward
    runs the root's hooks (gathering its parameters) wherever it is called from.
    """
    layers: tuple[type[torch.nn.Module], ...]
    param_dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = None
    output_dtype: Optional[torch.dtype] = None
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    load_from_rank_zero: bool = True

    def __call__(self, model: torch.nn.Module, mesh: Any = None) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if is_sharded(model):
            return model
        # Rank 0 loaded the checkpoint and the others built the same model on the meta device
        # (PolicyModule.load_model): rank 0's full tensors are kept until its shards have been sent.
        from_rank_zero = self.load_from_rank_zero and mesh is not None and mesh.size() > 1
        if self.activation_checkpointing:
            internals.apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, self.layers))
            disable_kv_cache_in_training(model)
        options: dict[str, Any] = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype, output_dtype=self.output_dtype
            ),
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        units = [module for module in model.modules() if isinstance(module, self.layers)]
        if not units:
            raise ValueError(f"no modules of class {sorted(c.__name__ for c in self.layers)} in {type(model).__name__}")
        full = (model.state_dict() if mesh.get_rank() == 0 else {}) if from_rank_zero else None
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.reshard_after_forward, **options)
        fully_shard(model, **options)
        if full is not None:
            fill_from_rank_zero(model, full, mesh)
        return model


def fill_from_rank_zero(model: torch.nn.Module, full: dict[str, torch.Tensor], mesh: Any) -> None:
    """Give every rank of ``mesh`` its shards of the weights rank 0 holds whole in ``full`` (the other ranks
    pass an empty dict and a meta-device ``model``): one tensor at a time, so no rank but 0 ever holds more
    than a tensor beyond its shards. Buffers, which are not sharded (and not all in the state dict, e.g.
    rotary frequencies), are sent whole. Collective: every rank of ``mesh`` calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    if any(tensor.is_meta for tensor in model.state_dict().values()):
        model.to_empty(device=device)
    else:
        model.to(device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    group = mesh.get_group()
    source = torch.distributed.get_global_rank(group, 0)
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=source, group=group)


def loads_once(strategy: Any) -> bool:
    """Whether only rank 0 reads the checkpoint under ``strategy`` (``fsdp`` or ``fsdp2`` with
    ``load_from_rank_zero``, on more than one rank): the others build an empty model and receive their
    weights from rank 0 when it is sharded (:func:`fsdp_strategy`, :func:`fill_from_rank_zero`)."""
    if isinstance(strategy, FSDPStrategy):
        # FSDP1 can fill meta-device modules from rank 0 when it both materialises them and syncs them.
        once = bool(strategy.kwargs.get("sync_module_states")) and strategy.kwargs.get("param_init_fn") is not None
    elif isinstance(strategy, FSDP2Strategy):
        once = strategy.parallelize.load_from_rank_zero
    else:
        return False
    return once and strategy.world_size > 1


def fsdp2_strategy(
    model: Union[ModelLoader, str],
    wrap_layers: Optional[list[str]] = None,
    activation_checkpointing: bool = False,
    mixed_precision: Optional[Mapping[str, Optional[str]]] = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    save_distributed_checkpoint: bool = True,
    load_from_rank_zero: bool = True,
    **kwargs: Any,
) -> Strategy:
    """FSDP2: Lightning's ``ModelParallelStrategy`` (data-parallel over every rank, no tensor parallelism)
    with a :class:`FullyShardPlan` that ``PolicyModule.configure_model`` applies.

    Args:
        model: the model loader or checkpoint path whose decoder-layer class becomes an FSDP unit.
        wrap_layers: class names to shard instead of the model's ``_no_split_modules``.
        activation_checkpointing: recompute each decoder layer's activations in backward.
        mixed_precision: ``{param_dtype, reduce_dtype, output_dtype}`` names (FSDP2 has no buffer dtype:
            buffers stay as loaded); None or empty: parameters compute in their own dtype, and
            ``trainer.precision=bf16-mixed`` autocasts as it does without sharding.
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3; False keeps
            them until backward, like FSDP1's SHARD_GRAD_OP).
        cpu_offload: not supported yet: ``ModelParallelStrategy.setup`` moves the whole module to the
            device after ``configure_model``, which would undo FSDP2's ``CPUOffloadPolicy`` (unverified
            without a GPU, so refused rather than left to fail mid-run).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint directory); False gathers
            a single file on rank 0.
        load_from_rank_zero: only rank 0 reads the checkpoint into host memory; the other ranks build the
            model on the meta device and receive their shards (:func:`fill_from_rank_zero`).
        kwargs: passed to ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).
    """
    if cpu_offload:
        raise NotImplementedError(
            "strategy=fsdp2 with cpu_offload=true is not supported: Lightning's ModelParallelStrategy moves the "
            "module to the GPU after configure_model, undoing the offload. Use strategy.activation_checkpointing, "
            "or strategy=fsdp strategy.cpu_offload=true for SFT."
        )
    dtypes = dict(mixed_precision or {})
    unknown = set(dtypes) - {"param_dtype", "reduce_dtype", "output_dtype"}
    if unknown:
        raise ValueError(
            f"strategy.mixed_precision: FSDP2 takes param_dtype, reduce_dtype and output_dtype, not {sorted(unknown)}"
        )
    plan = FullyShardPlan(
        layers=tuple(sorted(decoder_layer_classes(model, wrap_layers), key=lambda cls: cls.__name__)),
        activation_checkpointing=activation_checkpointing,
        reshard_after_forward=reshard_after_forward,
        cpu_offload=cpu_offload,
        load_from_rank_zero=load_from_rank_zero,
        **{key: _DTYPES[value] for key, value in dtypes.items() if value},
    )
    return FSDP2Strategy(plan, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every rank in one data-parallel group (the device mesh is
    ``(world size, 1)``), carrying the :class:`FullyShardPlan` that ``PolicyModule.configure_model``
    applies (``strategy.parallelize(model, strategy.device_mesh["data_parallel"])``)."""

    def __init__(self, parallelize: FullyShardPlan, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.parallelize = parallelize

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # Lightning's "auto" is the node count (tensor parallelism within a node): here every rank
            # is a data-parallel replica.
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        # Gradients are reduce-scattered after every backward and the sharded gradients accumulate:
        # skipping the sync would hold the whole model's unsharded gradients between micro-batches,
        # the memory FSDP is there to save (Lightning's FSDP1 strategy does the same).
        yield


def disable_kv_cache_in_training(model: torch.nn.Module) -> None:
    """Under activation checkpointing a forward that builds a KV cache (HF's default ``use_cache=True``
    when a caller does not pass it, as SFT's loss does) appends each layer's keys again when the layer is
    recomputed in backward, which then fails ("The size of tensor a (2L) must match the size of tensor b
    (L)"). ``config.use_cache=False``, as ``ModelLoader`` sets with ``model.gradient_checkpointing``;
    ``generate`` still caches (its generation config decides)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


# -- what a module needs from its strategy ---------------------------------------------------------------

def shard_models(module: Any, strategy: Optional[Strategy], names: tuple[str, ...] = ("model", "ref_model")) -> None:
    """Apply ``strategy``'s own sharding to the models ``module`` holds under ``names`` (the policy, GRPO's
    reference): ``strategy=fsdp2`` carries a ``parallelize(model, mesh)`` plan (:class:`FullyShardPlan`);
    other strategies wrap the module themselves (FSDP1, DDP) or not at all (None: no Trainer yet).
    Idempotent: a model already sharded is left as it is."""
    if internals.fsdp_activation_checkpointing(strategy):
        # strategy=fsdp activation_checkpointing=true: Lightning wraps the layers in checkpoint
        # wrappers after this hook; a KV cache built in forward breaks their recompute.
        disable_kv_cache_in_training(module.model)
    parallelize = getattr(strategy, "parallelize", None)
    if parallelize is None:
        return
    mesh = strategy.device_mesh["data_parallel"]
    for name in names:
        model = getattr(module, name, None)
        if model is not None:
            setattr(module, name, parallelize(model, mesh))



def check_strategy_supports(module: Any, strategy: Any) -> None:
    """Refuse pairings known to fail: manual optimization (a backward inside ``training_step``, as in
    GRPO) under Lightning's FSDP1 ``FSDPStrategy``, which runs ``training_step`` inside the root unit's
    forward; the backward then fails with "Expects BACKWARD_PRE or BACKWARD_POST state but got
    HandleTrainingState.FORWARD" (Lightning issues #19626, #19685, open in Lightning 2.6)."""
    if isinstance(strategy, FSDPStrategy) and not getattr(module, "automatic_optimization", True):
        raise ValueError(
            f"{type(module).__name__} optimizes manually (backward inside training_step), which Lightning's "
            "FSDPStrategy (strategy=fsdp) does not support: it fails with 'Expects BACKWARD_PRE or "
            "BACKWARD_POST state but got HandleTrainingState.FORWARD' (Lightning issues #19626, #19685). "
            "Use strategy=fsdp2 trainer=fsdp2 (FSDP2 fully_shard through ModelParallelStrategy) or strategy=ddp."
        )


def clip_gradients_by_norm(module: Any, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip ``module``'s gradients to a global norm of ``max_norm`` under whichever strategy trains it.

    Under ``strategy=fsdp`` (FSDP1) each rank holds a shard of every gradient, so the norm must be reduced
    over ranks: the root FSDP unit's ``clip_grad_norm_`` does that. Lightning's own
    ``clip_gradients(..., "norm")`` refuses FSDP1 for want of that root, which the Trainer's ``model`` is.
    Elsewhere Lightning clips (FSDP2's DTensor gradients reduce their norm themselves)."""
    if isinstance(module.trainer.strategy, FSDPStrategy):
        module.trainer.model.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
