"""Shard the tiny model with FSDP2 ``fully_shard`` over gloo, gather it with the export's
``full_state_dict`` and export it as ``PolicyModule.export`` does; rank 0 writes what matched.

    torchrun --nproc-per-node=2 -m tests.fsdp_export_run <output_dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from selfbudget_pl.models import ModelLoader, export_pretrained
from selfbudget_pl.weights import full_state_dict
from selfbudget_pl.strategies import decoder_layer_classes


class Holder(torch.nn.Module):
    """Stands in for the LightningModule: the policy sits at attribute ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    loader = ModelLoader()
    model = loader.load_model()
    with torch.no_grad():
        # Moved away from the checkpoint, so an export that reloaded it unchanged would not match.
        for parameter in model.parameters():
            parameter.add_(0.25)
    unsharded = {key: value.clone() for key, value in model.state_dict().items()}
    layers = tuple(decoder_layer_classes(loader))
    for module in model.modules():
        if isinstance(module, layers):
            fully_shard(module)
    root = fully_shard(Holder(model))
    sharded = sum(isinstance(parameter, DTensor) for parameter in root.parameters())

    full = full_state_dict(root, prefix="model.")  # collective: every rank calls it
    if dist.get_rank() == 0:
        fresh = loader.load_model()
        fresh.load_state_dict(full)
        out = export_pretrained(fresh, loader.load_tokenizer(), Path(output_dir, "export"))
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
        report = {
            "sharded_parameters": sharded,
            "gathered_equals_unsharded": same(full, unsharded),
            "export_equals_unsharded": same(exported, unsharded),
        }
        Path(output_dir, "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
