"""HF rollouts from a sharded policy on two CPU processes (gloo): the tiny model inside a PolicyModule (as
Lightning wraps it), sharded with the FSDP1 wrapper (one unit per decoder layer, ``use_orig_params=True``;
also with bfloat16 mixed precision, as configs/strategy/fsdp.yaml sets it) and with FSDP2 ``fully_shard``
(layers, then the root). Every rank samples its own prompts greedily and compares with the unsharded
model's output, computed in the same process before sharding.

Per case, each rank writes (all must be true):

* ``synced``: after ``sync_weights(root, "model.")``, completions equal the unsharded model's;
* ``validation_unsynced``: ``PolicyModule.generate_and_score`` (the validation path), with no sync;
* ``inside_root_forward``: the same from inside the root's forward, as Lightning runs validation_step
  and training_step, and the policy's logits after sampling are still right there;
* ``ranks_finish_apart``: rank 0's rows all end early (EOS) while rank 1's run on: no hang, same output;
* ``root_resharded``: after sampling, the root unit holds shards only again;
* ``after_step``: one optimizer step through the root, then sampling follows the new weights
  (``weights_moved``: the step changed the greedy output, so the check means something);
* ``clipped_to_max_grad_norm`` (FSDP1 only): ``PolicyModule.configure_gradient_clipping`` under
  ``strategy=fsdp`` brings the global gradient norm, over both ranks' shards, down to ``max_grad_norm``
  (Lightning's own ``clip_gradients(..., "norm")`` raises under FSDP1);
* ``inner_generate_fails``: the inner model's ``generate`` alone (what the backend did before) raises or
  differs: the root's embeddings and lm_head are shards outside its forward.

    torchrun --nproc-per-node=2 -m tests.fsdp_rollout_run <output_dir>
"""

from __future__ import annotations

import copy
import datetime
import sys
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist

from selfbudget_pl.models import ModelLoader
from selfbudget_pl.modules.base import PolicyModule
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.strategies import decoder_layer_classes, make_strategy

from .conftest import sharpen
from .rank_cases import run_cases

CASES = ["fsdp1", "fsdp1_bf16", "fsdp2"]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8)
NEVER_GRADED = SimpleNamespace(grade_batch=lambda answers, golds: [False] * len(answers))


def prompts_of(rank: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, 300, (length,), generator=generator).tolist() for length in (5, 9, 3)]


def sample(backend: HFRolloutBackend, prompts: list[list[int]]) -> list[list[int]]:
    return backend.generate(prompts, 1, GREEDY).completion_ids


def train_step(root: torch.nn.Module, vocab_size: int) -> None:
    """One SGD step on a batch every rank shares, so the sharded and the unsharded step agree."""
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.5)
    root(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def global_grad_norm(root: torch.nn.Module) -> float:
    """The gradients' norm over every rank's shards."""
    squares = sum(float(p.grad.float().pow(2).sum()) for p in root.parameters() if p.grad is not None)
    total = torch.tensor([squares], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.sqrt())


def clipped_to_max_grad_norm(module: PolicyModule, root: torch.nn.Module, loader: ModelLoader, vocab_size: int) -> bool:
    """One backward through the FSDP1 root, then the module's clipping as a Trainer with strategy=fsdp runs it."""
    trainer = module._trainer
    module._trainer = SimpleNamespace(strategy=make_strategy("fsdp", model=loader), model=root)
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    root(input_ids=ids, labels=ids).loss.backward()
    before = global_grad_norm(root)
    module.configure_gradient_clipping(optimizer=None)
    after = global_grad_norm(root)
    root.zero_grad(set_to_none=True)
    module._trainer = trainer
    return before > 2 * module.max_grad_norm and abs(after - module.max_grad_norm) < 1e-4


def shard(module: PolicyModule, kind: str, layers: tuple[type, ...]) -> torch.nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for submodule in module.model.modules():
            if isinstance(submodule, layers):
                fully_shard(submodule)
        return fully_shard(module)
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    precision = MixedPrecision(param_dtype=torch.bfloat16) if kind == "fsdp1_bf16" else None
    return FullyShardedDataParallel(
        module, auto_wrap_policy=ModuleWrapPolicy(set(layers)), device_id=torch.device("cpu"),
        use_orig_params=True, mixed_precision=precision,
    )  # fmt: skip


def root_resharded(root: torch.nn.Module, module: PolicyModule) -> bool:
    from torch.distributed.tensor import DTensor

    embeddings = module.model.get_input_embeddings().weight
    if isinstance(root, torch.distributed.fsdp.FullyShardedDataParallel):
        # The gathered copy of the root's flat parameter is freed; the embedding is a view of the shard.
        return root._handle.flat_param._full_param_padded.untyped_storage().size() == 0 and embeddings.dim() == 1
    return isinstance(embeddings, DTensor)


def run_case(kind: str, loader: ModelLoader, tokenizer, layers: tuple[type, ...]) -> dict:
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    rank = dist.get_rank()
    prompts = prompts_of(rank)
    batch = {"prompt_ids": prompts, "answer": ["1"] * len(prompts)}
    reference = sharpen(loader.load_model())
    if kind == "fsdp1_bf16":
        # What FSDP computes with: bfloat16 parameters, buffers (rotary frequencies) left as they are.
        for parameter in reference.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
    policy = copy.deepcopy(reference)
    unsharded = HFRolloutBackend(reference, tokenizer)
    expected = sample(unsharded, prompts)
    # Rank 0 stops every row after its second token; rank 1 samples on to the ceiling.
    eos_default = unsharded.eos_token_ids
    eos = sorted({row[1] for row in expected}) if rank == 0 else eos_default
    unsharded.eos_token_ids = eos
    expected_eos = sample(unsharded, prompts)

    module = PolicyModule(loader, optimizer=partial(torch.optim.SGD, lr=0.5), grader=NEVER_GRADED)
    module.model = policy
    root = shard(module, kind, layers)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))  # what weights_source reads

    report: dict = {}
    # Validation first, before anything syncs: its own backend learns the root from weights_source().
    report["validation_unsynced"] = module.generate_and_score(batch, GREEDY)[0].completion_ids == expected
    # Lightning runs validation_step and training_step inside the root's forward; GRPO's goes on to use
    # the policy after sampling, so the root's parameters must still be whole then.
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        expected_logits = reference(input_ids=ids).logits.float()

    def sample_then_score() -> tuple:
        rollouts, _ = module.generate_and_score(batch, GREEDY)
        with torch.no_grad():
            return rollouts, module.model(input_ids=ids).logits.float()

    module.sample_then_score = sample_then_score
    inside, logits = _ForwardRedirection()(root, module, "sample_then_score")
    report["inside_root_forward"] = inside.completion_ids == expected and torch.allclose(logits, expected_logits)

    backend = HFRolloutBackend(module.model, tokenizer)
    backend.sync_weights(root, "model.")
    report["synced"] = sample(backend, prompts) == expected
    report["root_resharded"] = root_resharded(root, module)
    backend.eos_token_ids = eos
    report["ranks_finish_apart"] = sample(backend, prompts) == expected_eos
    backend.eos_token_ids = eos_default

    if kind != "fsdp1_bf16":  # the step's arithmetic differs in bfloat16; the float32 cases cover it
        stepped = copy.deepcopy(reference)
        train_step(stepped, reference.config.vocab_size)
        expected_after = sample(HFRolloutBackend(stepped, tokenizer), prompts)
        train_step(root, reference.config.vocab_size)
        backend.sync_weights(root, "model.")
        report["after_step"] = sample(backend, prompts) == expected_after
        report["weights_moved"] = expected_after != expected

    if kind == "fsdp1":
        report["clipped_to_max_grad_norm"] = clipped_to_max_grad_norm(module, root, loader, reference.config.vocab_size)

    # Last: a failed forward may leave FSDP mid-state. This is the backend's old call.
    try:
        with torch.no_grad():
            ids = torch.tensor([prompts[0]])
            out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=GREEDY.max_new_tokens, synced_gpus=True)  # fmt: skip
        report["inner_generate_fails"] = out[0, ids.shape[1] :].tolist() != expected[0]
    except Exception as error:  # noqa: BLE001 - the failure is the point
        report["inner_generate_fails"] = True
        report["inner_generate_error"] = f"{type(error).__name__}: {error}"[:200]
    return report


def main(output_dir: str) -> None:
    # A hang (one rank stops all-gathering) fails in seconds instead of at the test's timeout.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    loader = ModelLoader()
    tokenizer = loader.load_tokenizer()
    layers = tuple(decoder_layer_classes(loader))
    run_cases(output_dir, {kind: partial(run_case, kind, loader, tokenizer, layers) for kind in CASES})

if __name__ == "__main__":
    main(sys.argv[1])
