"""Seconds per GRPO step, ours (GRPOModule + HFRolloutBackend in a Lightning Trainer) against TRL's
GRPOTrainer, on identical settings: the tiny model in fp32 on CPU, the same prompts, G, lengths,
reward, no vLLM. Runs alternate (ours, TRL, ours, TRL, ...) so machine load hits both alike.
Also rollout tokens/s of HFRolloutBackend against a bare ``model.generate`` on the same batch.

    pip install -e .[bench]      # trl
    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_vs_trl.py --rounds 3 --steps 6
    # GSM8K-shaped: real GSM8K test questions in the data config's prompt template, G = 5 as the paper
    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_vs_trl.py --prompt-set gsm8k --num-generations 5 --max-new-tokens 128

Prints one JSON object; the numbers go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from pathlib import Path
import statistics
import time
import warnings

import lightning as L
import torch
from omegaconf import OmegaConf

from selfbudget_pl.models import ModelLoader
from selfbudget_pl.data.collate import pad
from selfbudget_pl.data.prompts import build_prompt
from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend

TOY_PROMPTS = [
    "the sum of 3+4",
    "how many are there",
    "what is the total cost of 12+30+7 so",
    "each has more than",
    "find the product of 6 and 9",
    "half of the number is",
    "let x be twice y then",
    "the answer is",
]


def prompt_texts(prompt_set: str, tokenizer) -> list[str]:
    """Eight prompt texts: short toy strings, or the first GSM8K test questions as training renders them."""
    if prompt_set == "toy":
        return TOY_PROMPTS
    repo = Path(__file__).parents[1]
    template = OmegaConf.load(repo / "configs" / "data" / "gsm8k.yaml").prompt_template
    path = Path(os.environ.get("SELFBUDGET_DATA", repo.parent / "shared" / "data")) / "gsm8k" / "test.jsonl"
    with open(path) as lines:
        questions = [json.loads(line)["question"] for line, _ in zip(lines, range(8))]
    return [build_prompt(question, tokenizer, template) for question in questions]


def parity_of_first_token(completion_ids: list[list[int]]) -> list[float]:
    """A reward with variance in almost every group, cheap enough not to show in the timings."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


class ParityReward(L.Callback):
    def on_rollouts(self, trainer, pl_module, rollouts) -> None:
        rollouts.rewards = torch.tensor(parity_of_first_token(rollouts.completion_ids))


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def run_ours(loader: ModelLoader, prompt_ids: list[list[int]], args: argparse.Namespace) -> list[float]:
    rows = [{"prompt_ids": ids, "id": str(i)} for i, ids in enumerate(prompt_ids)]
    data = torch.utils.data.DataLoader(
        rows, batch_size=len(rows), collate_fn=lambda batch: {key: [row[key] for row in batch] for key in batch[0]}
    )
    module = GRPOModule(
        model_loader=loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
        num_generations=args.num_generations,
        sampling=dict(temperature=1.0, max_new_tokens=args.max_new_tokens),
        micro_batch_size=None,
        packed_forward=args.packed_forward,
        rollout=functools.partial(HFRolloutBackend, batch_size=len(rows) * args.num_generations),
        warmup_steps=0,
        min_lr_ratio=1.0,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ParityReward(), timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data)
    return timer.seconds


def run_trl(loader: ModelLoader, prompts: list[str], args: argparse.Namespace, output_dir: str) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *unused, **kwargs) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, *unused, **kwargs) -> None:
            self.seconds.append(time.perf_counter() - self._started)

    def reward(completions, completion_ids, **kwargs) -> list[float]:
        return parity_of_first_token(completion_ids)

    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(prompts) * args.num_generations,  # completions per step, as ours
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",  # token-level aggregation, our default
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=loader.load_model(),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts * (args.steps + 1)}),
        processing_class=loader.load_tokenizer(),
    )
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds


def rollout_throughput(loader: ModelLoader, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    """Generated tokens/s: HFRolloutBackend.generate vs model.generate on the same left-padded batch."""
    model, tokenizer = loader.load_model().eval(), loader.load_tokenizer()
    backend = HFRolloutBackend(model, tokenizer, batch_size=len(prompt_ids) * args.num_generations)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens)
    expanded = [ids for ids in prompt_ids for _ in range(args.num_generations)]
    input_ids, attention_mask = pad(expanded, tokenizer.pad_token_id, left=True)
    ours, bare = [], []
    for _ in range(args.rounds * 2):
        started = time.perf_counter()
        rollouts = backend.generate(prompt_ids, args.num_generations, sampling)
        ours.append(rollouts.num_generated_tokens / (time.perf_counter() - started))
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        generated = output[:, input_ids.shape[1] :]
        tokens = int((generated != tokenizer.pad_token_id).sum())
        bare.append(tokens / (time.perf_counter() - started))
    return {
        "ours_tokens_per_s": statistics.median(ours),
        "bare_generate_tokens_per_s": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/TRL runs")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is warm-up)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-set", choices=["toy", "gsm8k"], default="toy")
    parser.add_argument(
        "--packed-forward", action=argparse.BooleanOptionalAction, default=True,
        help="ours: log-probs on packed tokens (module.packed_forward)",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="/tmp/bench_grpo_trl")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    loader = ModelLoader()
    tokenizer = loader.load_tokenizer()
    prompts = prompt_texts(args.prompt_set, tokenizer)
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in prompts]

    ours, trl = [], []
    for round_index in range(args.rounds):
        torch.manual_seed(round_index)
        ours += run_ours(loader, prompt_ids, args)[1:]
        torch.manual_seed(round_index)
        trl += run_trl(loader, prompts, args, args.output_dir)[1:]
    results = {
        "settings": {
            "model": "tiny Qwen2 (~1M params), fp32, CPU", "threads": args.threads, "prompt_set": args.prompt_set,
            "prompt_tokens": [len(ids) for ids in prompt_ids], "packed_forward": args.packed_forward,
            "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
            "steps_timed": len(ours), "rounds": args.rounds,
        },
        "ours_s_per_step": statistics.median(ours),
        "trl_s_per_step": statistics.median(trl),
        "ratio_ours_over_trl": statistics.median(ours) / statistics.median(trl),
        "rollout": rollout_throughput(loader, prompt_ids, args),
    }  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
