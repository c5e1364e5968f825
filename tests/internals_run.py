"""The FSDP accessors of ``selfbudget_pl.internals`` on real FSDP1 and FSDP2 units, two CPU ranks (gloo),
on a two-block toy module (no transformers model: this checks torch's objects, fast).

Per case, each rank writes its checks (all must be true):

* FSDP1: ``wrapped``: ``fsdp1_wrapped_module`` is the module the unit wraps (root and nested unit);
  ``wrapper_name_transparent``: the unit holds it under a name in ``TRANSPARENT_CHILDREN``;
  ``original_parameters``: with ``use_orig_params=True`` the wrapped module's parameters are no
  ``FlatParameter``; ``idle_outside``/``busy_inside``: ``fsdp_training_state`` is IDLE outside the forward,
  not inside it; ``gathered_after_forward``: after a no-grad forward the root still holds its gathered
  parameters (what ``fsdp1_reshard`` must undo), and ``resharded``: ``fsdp1_reshard`` returns True and frees
  them, leaving the parameters as views of this rank's shard;
* FSDP1 with ``use_orig_params=False``: ``flat_parameter``: the wrapped module's own state is one
  ``FlatParameter``, which ``is_flat_parameter`` recognises (the weight walk skips it);
* FSDP2: ``idle_outside``/``busy_inside``/``idle_after``: the same states through ``_get_fsdp_state()``.

    torchrun --nproc-per-node=2 -m tests.internals_run <output_dir>
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from selfbudget_pl import internals

from .rank_cases import run_cases


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class Net(torch.nn.Module):
    """A root with parameters of its own (as a decoder's embeddings and lm_head) around two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.states_inside: list = []  # what a probe reads during the forward
        self.probe = lambda: None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.states_inside.append(self.probe())
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def fsdp1() -> dict:
    torch.manual_seed(0)
    net = Net()
    root = FullyShardedDataParallel(
        net, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"), use_orig_params=True
    )
    net.probe = lambda: internals.fsdp_training_state(root)
    inner_unit = net.blocks[0]
    wrapper_names = [name for name, child in internals.child_modules(root).items() if child is net]
    report = {
        "wrapped": internals.fsdp1_wrapped_module(root) is net
        and isinstance(inner_unit, FullyShardedDataParallel)
        and isinstance(internals.fsdp1_wrapped_module(inner_unit), Block),
        "wrapper_name_transparent": len(wrapper_names) == 1 and wrapper_names[0] in internals.TRANSPARENT_CHILDREN,
        "original_parameters": not any(internals.is_flat_parameter(tensor) for _, tensor in internals.own_state(net.embed)),
        "idle_outside": internals.fsdp_training_state(root) == "IDLE",
    }
    with torch.no_grad():
        root(torch.ones(2, 8))
    report["busy_inside"] = net.states_inside[-1] not in (None, "IDLE")
    # The padded full flat parameter: allocated while gathered, its storage freed when resharded.
    full = root._handle.flat_param._full_param_padded
    report["gathered_after_forward"] = full.untyped_storage().size() > 0
    report["resharded"] = internals.fsdp1_reshard(root) and full.untyped_storage().size() == 0
    report["parameters_sharded"] = net.embed.weight.dim() == 1
    report["idle_after"] = internals.fsdp_training_state(root) == "IDLE"
    return report


def fsdp1_flat() -> dict:
    net = Net()
    FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=False)
    own = internals.own_state(net)
    return {"flat_parameter": len(own) == 1 and internals.is_flat_parameter(own[0][1])}


def fsdp2() -> dict:
    torch.manual_seed(0)
    net = Net()
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    net.probe = lambda: internals.fsdp_training_state(net)
    report = {"idle_outside": internals.fsdp_training_state(net) == "IDLE"}
    with torch.no_grad():
        net(torch.ones(2, 8))
    report["busy_inside"] = net.states_inside[-1] not in (None, "IDLE")
    report["idle_after"] = internals.fsdp_training_state(net) == "IDLE"
    report["block_idle"] = internals.fsdp_training_state(net.blocks[0]) == "IDLE"
    return report


def main(output_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    run_cases(output_dir, {"fsdp1": fsdp1, "fsdp1_flat": fsdp1_flat, "fsdp2": fsdp2})


if __name__ == "__main__":
    main(sys.argv[1])
