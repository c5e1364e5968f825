"""Two gloo ranks share one GRPO mini-batch (rank 0 the short completions, rank 1 the long ones); each
backpropagates its part of the token-aggregated loss with GRPOModule's normaliser and the gradients are
averaged over ranks, as DDP and FSDP do. Rank 0 saves the result for tests/test_distributed.py, which
compares it with one process over the whole mini-batch.

    torchrun --nproc-per-node=2 -m tests.normaliser_run <output_dir>
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from selfbudget_pl.models import ModelLoader
from selfbudget_pl.modules.experience import Experience
from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.modules.losses import group_advantages

# Completion lengths per row; groups of 2. Rows 0-3 go to rank 0, rows 4-7 to rank 1.
LENGTHS = [2, 3, 2, 3, 12, 9, 14, 11]
PROMPT = 5


def grpo_module() -> GRPOModule:
    module = GRPOModule(
        model_loader=ModelLoader(), optimizer=partial(torch.optim.AdamW), num_generations=2,
        sampling={"temperature": 0.7, "max_new_tokens": 16}, loss_aggregation="token", head_chunk_tokens=7,
    )  # fmt: skip
    module.configure_model()
    return module


def mini_batch(vocab: int) -> Experience:
    generator = torch.Generator().manual_seed(0)
    rows, width = len(LENGTHS), max(LENGTHS)
    completion_mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    completion_ids = torch.randint(vocab, (rows, width), generator=generator) * completion_mask
    prompt_ids = torch.randint(vocab, (rows, PROMPT), generator=generator)
    rewards = torch.rand(rows, generator=generator)
    return Experience(prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, group_advantages(rewards, 2))


def gradients(module: GRPOModule, part: Experience, normaliser: float) -> dict[str, torch.Tensor]:
    """The gradient of ``part``'s share of the loss, divided by ``normaliser``."""
    module.model.zero_grad(set_to_none=True)
    loss, _, _ = module.micro_batch_loss(part, normaliser)
    loss.loss.backward()
    return {name: p.grad.clone() for name, p in module.model.named_parameters()}


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = grpo_module()
    experience = mini_batch(module.model.config.vocab_size)
    share = len(LENGTHS) // world
    part = experience.rows(rank * share, (rank + 1) * share)
    grads = gradients(module, part, module._normaliser(part))
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world  # what DDP's all-reduce and FSDP's reduce-scatter do: the mean over ranks
    if rank == 0:
        torch.save(grads, Path(output_dir) / "distributed_grads.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
