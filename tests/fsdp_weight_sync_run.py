"""The vLLM weight sync under FSDP on two CPU processes (gloo): the tiny model, plain and with LoRA,
sharded with FSDP2 ``fully_shard`` and with the FSDP1 wrapper (as Lightning's FSDPStrategy wraps it:
one unit per decoder layer, ``use_orig_params=True``), synced into a stand-in engine on every rank.

Per case, each rank writes what its engine received against two references:

* before training, the unsharded model's own weights (``merge_and_unload`` under LoRA);
* after one optimizer step, torch's own full state dict (``get_model_state_dict``), merged by peft.

The stand-in engine is a GPU one, so it runs (and receives) bfloat16 from the float32 model; under FSDP2 each
rank casts its shard before the all-gather, which moves bfloat16 (recorded by :class:`GatherDtypes`).

    torchrun --nproc-per-node=2 -m tests.fsdp_weight_sync_run <output_dir>
"""

from __future__ import annotations

import hashlib
import sys
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from selfbudget_pl.models import LoraSettings, ModelLoader, apply_lora
from selfbudget_pl.weights import full_state_dict
from selfbudget_pl.strategies import decoder_layer_classes

from .rank_cases import run_cases
from .vllm_stand_in import install_stand_in_vllm

CASES = [("fsdp2", False), ("fsdp2", True), ("fsdp1", False), ("fsdp1", True)]
GATHERED = {  # the dtypes the sync's all-gathers send, per case
    ("fsdp2", False): {"torch.bfloat16"}, ("fsdp2", True): {"torch.bfloat16", "torch.float32"},
    ("fsdp1", False): {"torch.float32"}, ("fsdp1", True): {"torch.float32"},
}


class GatherDtypes(TorchDispatchMode):
    """Notes the dtype of every tensor an all-gather collective sends while active."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "gather" in str(func):  # c10d's allgather (FSDP1) and the functional all_gather (DTensor)
            self.dtypes.update(str(leaf.dtype) for leaf in tree_leaves(args) if isinstance(leaf, torch.Tensor))
        return func(*args, **(kwargs or {}))


class Holder(torch.nn.Module):
    """Stands in for the LightningModule: the policy sits at attribute ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


class RecordingLLM:
    """Stand-in ``vllm.LLM``: its worker's in-place reload records the weights it is handed."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"] or 2048))
        self.reloads: list[list[tuple[str, torch.Tensor]]] = []

    def collective_rpc(self, method, kwargs) -> None:
        assert method == "reload_weights"
        # Copied as they come, as the engine copies into its own parameters: gathered storage is released after.
        self.reloads.append([(name, tensor.detach().clone()) for name, tensor in kwargs["weights_iterator"]])

    def reset_prefix_cache(self) -> None:
        pass

    def received(self) -> dict[str, torch.Tensor]:
        return dict(self.reloads[-1])


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def in_engine_dtype(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(torch.bfloat16) for key, value in state.items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for key in sorted(state):
        hasher.update(key.encode())
        hasher.update(state[key].float().numpy().tobytes())
    return hasher.hexdigest()


def build(loader: ModelLoader, lora: bool) -> torch.nn.Module:
    """The same model on every rank: moved off the checkpoint (LoRA B included, so merging matters)."""
    torch.manual_seed(0)
    model = loader.load_model()
    if lora:
        model = apply_lora(model, LoraSettings(enabled=True, r=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def merged(loader: ModelLoader, lora: bool, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What vLLM should hold for the raw (peft) weights ``raw``: peft's own merge."""
    if not lora:
        return raw
    model = apply_lora(loader.load_model(), LoraSettings(enabled=True, r=4))
    model.load_state_dict(raw)
    return {key: value.clone() for key, value in model.merge_and_unload().state_dict().items()}


def shard(model: torch.nn.Module, kind: str, layers: tuple[type, ...]) -> torch.nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, layers):
                fully_shard(module)
        return fully_shard(Holder(model))
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        Holder(model), auto_wrap_policy=ModuleWrapPolicy(set(layers)), device_id=torch.device("cpu"),
        use_orig_params=True,
    )  # fmt: skip


def run_case(kind: str, lora: bool, loader: ModelLoader, tokenizer, layers: tuple[type, ...]) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = build(loader, lora)
    raw_before = {key: value.clone() for key, value in model.state_dict().items()}
    expected_before = merged(loader, lora, raw_before)
    full_numel = sum(parameter.numel() for parameter in model.parameters())
    vocab_size = model.config.vocab_size
    root = shard(model, kind, layers)
    local_numel = sum(parameter.to_local().numel() if hasattr(parameter, "to_local") else parameter.numel()
                      for parameter in root.parameters())  # fmt: skip

    backend = VLLMRolloutBackend(model, tokenizer)
    engine = backend.llm
    backend.sync_weights(root, "model.")
    received_before = engine.received()
    # Training weights untouched by the sync (no merge left behind, no writeback): gathered raw again.
    raw_after_sync = full_state_dict(root, "model.")

    optimizer = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(dist.get_rank()))
    root(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    oracle = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True))
    oracle = {key[len("model.") :]: value.clone() for key, value in oracle.items() if key.startswith("model.")}
    expected_after = merged(loader, lora, oracle)
    with GatherDtypes() as gathers:
        backend.sync_weights(root, "model.")
    received_after = engine.received()

    return {
        "sharded": local_numel < full_numel,
        "external_launcher": engine.kwargs.get("distributed_executor_backend") == "external_launcher",
        "one_reload_per_sync": len(engine.reloads) == 2,
        "names_once": len(engine.reloads[-1]) == len(received_after),
        "before_equals_unsharded": same(received_before, in_engine_dtype(expected_before)),
        "after_step_equals_torch_state_dict": same(received_after, in_engine_dtype(expected_after)),
        # FSDP1 gathers a unit's flat parameter as it is (float32), and LoRA layers merge in float32, then cast.
        "gathers_in_engine_dtype": gathers.dtypes == GATHERED[kind, lora],
        "weights_moved": not same(expected_after, expected_before),
        "sync_left_training_weights": dist.get_rank() != 0 or same(raw_after_sync, raw_before),
        "digest": digest(received_after),
    }


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    install_stand_in_vllm(RecordingLLM)
    loader = ModelLoader()
    tokenizer = loader.load_tokenizer()
    layers = tuple(decoder_layer_classes(loader))
    run_cases(
        output_dir,
        {
            f"{kind}{'_lora' if lora else ''}": partial(run_case, kind, lora, loader, tokenizer, layers)
            for kind, lora in CASES
        },
    )

if __name__ == "__main__":
    main(sys.argv[1])
