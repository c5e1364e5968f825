"""Load once under FSDP1 on two CPU processes (gloo), as ``strategy=fsdp`` does under Lightning: the strategy
from ``make_strategy("fsdp")`` with its defaults, ``PolicyModule.configure_model`` on each rank, then the
FSDP1 wrapper around the module with the strategy's own arguments (Lightning's ``FSDPStrategy._setup_model``,
which needs a GPU, does the same).

    torchrun --nproc-per-node=2 -m tests.fsdp1_load_once_run <output_dir> [checkpoint]

``checkpoint`` defaults to the tiny model (tied embeddings). Each rank writes ``rank<N>.json``:

* ``loads``: its ``from_pretrained`` calls while loading and wrapping (rank 0: one; the others: none);
* ``was_meta``: the model it held before wrapping was on the meta device;
* ``load_mib``: its peak resident memory while loading and wrapping, above what it held before, in MiB;
* ``weights_equal_checkpoint``, ``buffers_equal_checkpoint``: the gathered weights and its buffers (rotary
  frequencies, outside the state dict) equal the checkpoint's bitwise, as ``from_pretrained`` loads it;
* ``tied``, ``tied_in_checkpoint``: lm_head and embed_tokens share one parameter, after wrapping and in
  the checkpoint's own model.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional
from unittest import mock

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from torch.distributed.fsdp import FullyShardedDataParallel, _init_utils
from transformers import AutoModelForCausalLM

from selfbudget_pl.models import ModelLoader
from selfbudget_pl.modules.base import PolicyModule
from selfbudget_pl.strategies import make_strategy
from selfbudget_pl.weights import iter_full_weights

from .fsdp_load_once_run import MIB, peak_since_reset, reset_peak, resident


def tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def main(output_dir: str, checkpoint: Optional[str] = None) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    # FSDP1 refuses CPU tensors under sync_module_states because NCCL cannot broadcast them; gloo can, and
    # Lightning's FSDPStrategy (GPU-only) never meets the check.
    _init_utils._check_module_states_for_sync_module_states = lambda states: None
    loader = ModelLoader(name_or_path=checkpoint, dtype="float32")
    strategy = make_strategy("fsdp", model=loader, mixed_precision=None)
    # The ranks torchrun started and their devices, as Lightning's connector sets them.
    strategy.cluster_environment = TorchElasticEnvironment()
    strategy.parallel_devices = [torch.device("cpu")] * dist.get_world_size()
    module = PolicyModule(loader, optimizer=torch.optim.SGD)
    module._trainer = SimpleNamespace(strategy=strategy, global_rank=rank)

    reset_peak()
    before = resident()
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", wraps=AutoModelForCausalLM.from_pretrained) as load:
        module.configure_model()
        was_meta = any(param.is_meta for param in module.model.parameters())
        root = FullyShardedDataParallel(
            module, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision,
            sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs,
        )  # fmt: skip
    load_mib = (peak_since_reset() - before) / MIB

    full = {name: tensor.clone() for name, tensor in iter_full_weights(root, "model.", merge_lora=False)}
    reference = AutoModelForCausalLM.from_pretrained(loader.path, dtype=torch.float32)
    expected = reference.state_dict()
    buffers = {name.replace("_fsdp_wrapped_module.", ""): buffer for name, buffer in module.model.named_buffers()}
    expected_buffers = dict(reference.named_buffers())
    report = {
        "loads": load.call_count,
        "was_meta": was_meta,
        "load_mib": load_mib,
        "weights_equal_checkpoint": full.keys() == expected.keys()
        and all(torch.equal(full[name], expected[name]) for name in full),
        "buffers_equal_checkpoint": buffers.keys() == expected_buffers.keys()
        and all(torch.equal(buffers[name], expected_buffers[name]) for name in buffers),
        "tied": tied(module.model),
        "tied_in_checkpoint": tied(reference),
    }
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
