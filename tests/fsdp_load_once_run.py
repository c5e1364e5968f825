"""Load a model once for two ranks and export it streamed, measuring each rank's resident memory.

    python -m tests.fsdp_load_once_run <output_dir> prepare          # the bfloat16 checkpoint, once
    python -m tests.fsdp_load_once_run <output_dir> single           # one process loads the model
    torchrun --nproc-per-node=2 -m tests.fsdp_load_once_run <output_dir> every|once

The checkpoint is stored in bfloat16 and trained in float32, as the hub's are: loading makes a float32 copy
in host memory (a float32 checkpoint would be memory-mapped, its pages shared by the ranks). ``every``: each
rank loads it, then ``FullyShardPlan`` shards it (``load_from_rank_zero=False``); ``once``: rank 0 loads it and
rank 1 builds the model on the meta device (as ``PolicyModule.load_model`` does), and sharding fills rank 1's
shards from rank 0. Then the gathered weights are compared with the checkpoint, exported with
``export_streamed`` and read back. Each process writes ``<mode>.rank<N>.json``: its peak resident memory
during loading and sharding (and during the export) above what it held before, in MiB.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from selfbudget_pl.models import ModelLoader, export_streamed
from selfbudget_pl.strategies import FullyShardPlan, decoder_layer_classes
from selfbudget_pl.weights import is_sharded, iter_full_weights

# ~58M parameters (232 MiB in float32): large enough that a whole copy stands out of the processes' noise.
SPEC = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 8,
        "num_key_value_heads": 8, "tie_word_embeddings": False}
MIB = 1024**2


def loader(output_dir: Path) -> ModelLoader:
    return ModelLoader(name_or_path=str(output_dir / "checkpoint"), dtype="float32")


def prepare(output_dir: Path) -> None:
    """The tiny model of :data:`SPEC`, saved in bfloat16."""
    tiny = ModelLoader(tiny=SPEC)
    model = tiny.load_model().to(torch.bfloat16)
    model.save_pretrained(output_dir / "checkpoint")
    tiny.load_tokenizer().save_pretrained(output_dir / "checkpoint")


def resident() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_since_reset() -> float:
    """The resident high-water mark since the last :func:`reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current resident size


def main(output_dir: str, mode: str) -> None:
    out = Path(output_dir)
    if mode == "prepare":
        prepare(out)
        return
    model_loader = loader(out)
    reset_peak()
    before = resident()
    if mode == "single":
        model = model_loader.load_model()
        report = {"load_mib": (peak_since_reset() - before) / MIB,
                  "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB}
        (out / "single.rank0.json").write_text(json.dumps(report))
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    once = mode == "once"
    model = model_loader.load_model() if rank == 0 or not once else model_loader.build_empty_model()
    was_meta = any(p.is_meta for p in model.parameters())
    plan = FullyShardPlan(layers=tuple(decoder_layer_classes(model_loader)), load_from_rank_zero=once)
    model = plan(model, mesh)
    load_mib = (peak_since_reset() - before) / MIB

    full = {name: tensor.clone() for name, tensor in iter_full_weights(model, "", merge_lora=False)}
    reset_peak()
    before_export = resident()
    export_streamed(iter_full_weights(model, "", merge_lora=True), model, model_loader.load_tokenizer(),
                    out / f"export_{mode}", write=rank == 0, max_shard_bytes=16 * MIB)
    export_mib = (peak_since_reset() - before_export) / MIB
    report = {"rank": rank, "was_meta": was_meta, "sharded": is_sharded(model), "load_mib": load_mib,
              "export_mib": export_mib}
    if rank == 0:
        checkpoint = AutoModelForCausalLM.from_pretrained(model_loader.path, dtype=torch.float32).state_dict()
        exported = AutoModelForCausalLM.from_pretrained(out / f"export_{mode}").state_dict()
        report["gathered_equals_checkpoint"] = full.keys() == checkpoint.keys() and all(
            torch.equal(full[key], checkpoint[key]) for key in full)
        report["export_equals_checkpoint"] = exported.keys() == checkpoint.keys() and all(
            torch.equal(exported[key], checkpoint[key]) for key in exported)
        report["export_files"] = sorted(path.name for path in (out / f"export_{mode}").iterdir())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    report["buffers_finite"] = all(bool(torch.isfinite(b).all()) for b in buffers.values() if b.is_floating_point())
    (out / f"{mode}.rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
